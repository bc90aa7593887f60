"""Official TokenBridge / MAR checkpoints -> tokenbridge generators (tokenbridge.official), checked on official-format
checkpoints built here (official key names and shapes, random tensors, a small configuration) against a reference
of the released math (tests/official_format.py)."""

from __future__ import annotations

import official_format as off
import pytest
import torch

import tokenbridge.generators.tokenbridge as TB_MODULE
from tokenbridge.checkpoint import load_generator
import tokenbridge.official.presets as PRESETS
from tokenbridge.cli import main
from tokenbridge.official import (
    ConversionError,
    convert,
    convert_mar,
    convert_tokenbridge,
)
from tokenbridge.diffusion import DiffusionHead
from tokenbridge.generators import ContinuousMARGenerator, TokenBridgeGenerator
from tokenbridge.heads import DimensionwiseARHead
from tokenbridge.layers import cfg_rows, guide
from tokenbridge.quantizer import released_values

ATOL = 2e-5


def _tb(ckpt=None, **options):
    return convert_tokenbridge(ckpt or off.tokenbridge_checkpoint(), num_heads=off.HEADS,
                               head_num_heads=off.HEAD_HEADS, **options)


def _mar(ckpt=None):
    return convert_mar(ckpt or off.mar_checkpoint(), num_heads=off.HEADS)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(3, off.L, off.C, generator=g)
    mask = torch.zeros(3, off.L, dtype=torch.bool)
    for row in range(3):
        mask[row, torch.randperm(off.L, generator=g)[:11]] = True
    return tokens, torch.tensor([1, 5, 9]), mask


# ---------------------------------------------------------------------------------------------- strict mapping


def test_tokenbridge_every_key_consumed_and_ema_buffers_from_model():
    ckpt = off.tokenbridge_checkpoint()
    model = _tb(ckpt)
    assert isinstance(model, TokenBridgeGenerator) and model.config["head"]["kind"] == "ar"
    assert type(model.head) is DimensionwiseARHead  # the plain head, the released layout folded into its weights
    source = model.provenance["source"]
    assert sorted(source["buffers_from_model"]) == sorted(["reconstruction_values", "boundaries", "channel_mask"])
    assert model.provenance["ema"] and model.provenance["step"] == 399
    assert model.head.order.tolist() == off.ORDER
    assert model.backbone.encoder_norm.eps == 1e-6 and model.quantizer.tails == "clamped"
    # every official tensor landed: the EMA weights, the fake latent as the unconditional class row
    ema = ckpt["model_ema"]
    assert torch.equal(model.backbone.class_emb.weight[-1], ema["fake_latent"][0])
    assert torch.equal(model.head.out_w[3], ema["channel_heads.3.weight"].t())
    assert torch.equal(model.head.tok_emb.weight[2 * off.LEVELS:3 * off.LEVELS], ema["token_embeddings.2.weight"])
    raw = convert_tokenbridge(ckpt, "model", num_heads=off.HEADS, head_num_heads=off.HEAD_HEADS)
    assert torch.equal(raw.backbone.mask_token, ckpt["model"]["mask_token"]) and not raw.provenance["ema"]


def test_mar_every_key_consumed():
    model = _mar()
    assert isinstance(model, ContinuousMARGenerator) and model.family == "mar"
    head = model.config["head"]
    assert type(model.head) is DiffusionHead and head["full_batch_noise"]
    assert set(head) == {"width", "depth", "train_steps", "full_batch_noise", "vb_objective"}


def test_family_told_by_keys():
    assert convert(off.mar_checkpoint(), num_heads=off.HEADS).family == "mar"
    assert convert(off.tokenbridge_checkpoint(), num_heads=off.HEADS, head_num_heads=off.HEAD_HEADS).family == \
        "tokenbridge"
    with pytest.raises(ConversionError, match="official MAR checkpoint"):
        _tb(off.mar_checkpoint())


@pytest.mark.parametrize("weights", ["model_ema", "model"])
def test_renamed_missing_unexpected_and_wrong_shape_are_named(weights):
    ckpt = off.tokenbridge_checkpoint()
    sd = ckpt[weights]
    sd["encoder_blocks.0.mlp.fc_1.weight"] = sd.pop("encoder_blocks.0.mlp.fc1.weight")  # renamed
    del sd["channel_heads.3.bias"]  # missing
    sd["token_embeddings.2.weight"] = torch.zeros(off.LEVELS + 1, off.W)  # wrong shape
    sd["extra.thing"] = torch.zeros(2)  # unexpected
    with pytest.raises(ConversionError) as err:
        convert_tokenbridge(ckpt, weights, num_heads=off.HEADS, head_num_heads=off.HEAD_HEADS)
    message = str(err.value)
    for name in ("encoder_blocks.0.mlp.fc1.weight", "encoder_blocks.0.mlp.fc_1.weight", "channel_heads.3.bias",
                 "extra.thing"):
        assert name in message
    assert f"token_embeddings.2.weight: ({off.LEVELS + 1}, {off.W}), expected ({off.LEVELS}, {off.W})" in message


def test_mar_wrong_shape_and_missing_named():
    ckpt = off.mar_checkpoint()
    ckpt["model_ema"]["diffloss.net.res_blocks.1.in_ln.weight"] = torch.zeros(3)
    del ckpt["model_ema"]["diffloss.net.final_layer.linear.bias"]
    with pytest.raises(ConversionError, match=r"res_blocks\.1\.in_ln\.weight: \(3,\), expected") as err:
        _mar(ckpt)
    assert "diffloss.net.final_layer.linear.bias" in str(err.value)


def test_quantizer_tables_checked():
    ckpt = off.tokenbridge_checkpoint()
    ckpt["model"]["reconstruction_values"] = ckpt["model"]["reconstruction_values"] * 1.1
    with pytest.raises(ConversionError, match="reconstruction_values differs"):
        _tb(ckpt)


# ---------------------------------------------------------------------------------------------- the released math


@pytest.mark.parametrize("family", ["tokenbridge", "mar"])
def test_backbone_z_matches_official(family):
    ckpt = off.tokenbridge_checkpoint() if family == "tokenbridge" else off.mar_checkpoint()
    model, sd = (_tb(ckpt), ckpt["model_ema"]) if family == "tokenbridge" else (_mar(ckpt), ckpt["model_ema"])
    out_pos = "output_pos_embed" if family == "tokenbridge" else "diffusion_pos_embed_learned"
    tokens, labels, mask = _inputs()
    with torch.no_grad():
        z = model.backbone(tokens, labels, mask)
        ref = off.ref_backbone(sd, tokens, sd["class_emb.weight"][labels], mask, out_pos)
        torch.testing.assert_close(z, ref, atol=ATOL, rtol=1e-5)
        uncond = model.backbone(tokens, torch.full_like(labels, off.CLASSES), mask)
        ref_u = off.ref_backbone(sd, tokens, sd["fake_latent"].expand(3, -1), mask, out_pos)
        torch.testing.assert_close(uncond, ref_u, atol=ATOL, rtol=1e-5)


def _head_case(seed=0):
    ckpt = off.tokenbridge_checkpoint(seed)
    model = _tb(ckpt)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(5, off.D, generator=g)
    indices = torch.randint(0, off.LEVELS, (5, off.C), generator=g)
    return model, ckpt["model_ema"], z, indices, indices[:, off.ORDER]


def test_head_logits_training_path_match_official():
    model, sd, z, indices, classes = _head_case()
    with torch.no_grad():
        torch.testing.assert_close(model.head.step_logits(z, indices), off.ref_head(sd, z, classes, False),
                                   atol=ATOL, rtol=1e-5)
        # natural-order forward is the same logits, un-permuted
        torch.testing.assert_close(model.head(z, indices), off.ref_head(sd, z, classes, False)[:, model.head.inverse],
                                   atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("use_cache", [True, False])
def test_head_logits_sampling_path_match_official_cached_and_uncached(use_cache):
    model, sd, z, indices, classes = _head_case(1)
    logits = model.head.sampling_logits(z, indices, use_cache=use_cache)
    torch.testing.assert_close(logits, off.ref_head(sd, z, classes, True), atol=ATOL, rtol=1e-5)


def test_cached_and_uncached_agree_in_official_layout():
    model, _, z, indices, _ = _head_case(2)
    cached = model.head.sampling_logits(z, indices, use_cache=True)
    uncached = model.head.sampling_logits(z, indices, use_cache=False)
    torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=1e-5)
    a = model.head.sample(z, temperature=1.0, generator=torch.Generator().manual_seed(3), use_cache=True)
    b = model.head.sample(z, temperature=1.0, generator=torch.Generator().manual_seed(3), use_cache=False)
    assert torch.equal(a[0], b[0])


def test_first_token_quirk_is_the_first_input_only():
    ckpt = off.tokenbridge_checkpoint(4)
    with_quirk, without = _tb(ckpt), _tb(ckpt, first_token_timestep=False)
    g = torch.Generator().manual_seed(4)
    z, indices = torch.randn(4, off.D, generator=g), torch.randint(0, off.LEVELS, (4, off.C), generator=g)
    on, off_ = with_quirk.head.sampling_logits(z, indices), without.head.sampling_logits(z, indices)
    assert not torch.allclose(on[:, 0], off_[:, 0], atol=1e-4)  # the first channel's logits move
    # ... only through the first input: the training path ignores the option, and with e_0 = 0 it is a no-op
    torch.testing.assert_close(with_quirk.head.step_logits(z, indices), without.head.step_logits(z, indices))
    torch.testing.assert_close(off_, without.head.step_logits(z, indices), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        with_quirk.head.cond_pos[0].zero_()
        without.head.cond_pos[0].zero_()
    torch.testing.assert_close(with_quirk.head.sampling_logits(z, indices), without.head.sampling_logits(z, indices))


def test_diffusion_mlp_matches_official():
    ckpt = off.mar_checkpoint(5)
    model, sd = _mar(ckpt), ckpt["model_ema"]
    g = torch.Generator().manual_seed(5)
    x, c = torch.randn(6, off.C, generator=g), torch.randn(6, off.D, generator=g)
    t = torch.tensor([0, 5, 999, 500, 17, 250])
    with torch.no_grad():
        eps, v = model.head.denoise(x, t, model.head.z_cond(c))
        ref = off.ref_mlp(sd, x, t, c)
    torch.testing.assert_close(torch.cat([eps, v], 1), ref, atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- CFG on z


def test_cfg_on_z_with_cfg_one_equals_no_guidance():
    model = _tb()
    labels = torch.tensor([0, 3])
    base = model.sample(labels, num_iter=4, generator=1, cfg=None)
    for mix in ("z", "logits"):
        out = model.sample(labels, num_iter=4, generator=1, cfg=1.0, cfg_mix=mix)
        assert torch.equal(out["indices"], base["indices"])
    z = torch.randn(6, off.D)
    mixed = guide(z, cfg_rows(z, 1.0)[1])  # the mix cfg_mix="z" applies
    torch.testing.assert_close(mixed, z[:3])  # u + 1 * (c - u): c up to rounding


def test_cfg_on_z_mixes_features_before_the_head(monkeypatch):
    model = _tb()
    zc, zu = torch.randn(4, off.D), torch.randn(4, off.D)
    torch.testing.assert_close(guide(torch.cat([zc, zu]), cfg_rows(zc.repeat(2, 1), 2.0)[1]), zu + 2.0 * (zc - zu))
    scales, heads = [], []
    monkeypatch.setattr(TB_MODULE, "cfg_rows", lambda z, cfg: scales.append(cfg) or cfg_rows(z, cfg))
    head_sample = model.head.sample
    monkeypatch.setattr(model.head, "sample", lambda z, **kw: heads.append((z.shape[0], kw["cfg"])) or
                        head_sample(z, **kw))
    model.sample(torch.tensor([1, 2]), num_iter=2, cfg=3.0, cfg_mix="z", generator=0)
    # the head gets the mixed features (N rows per position, not 2N; no guidance of its own) ...
    assert [c for _, c in heads] == [None, None] and sum(n for n, _ in heads) == 2 * off.L
    # ... and the last step's linear scale stops at 1 + (cfg - 1)(L - 1)/L: the released sampler's mask length is 1
    last = 1 + 2.0 * (off.L - 1) / off.L
    assert len(scales) == 2 and scales[0] < last and scales[1] == pytest.approx(last)
    a = model.sample(torch.tensor([1, 2]), num_iter=3, cfg=3.0, cfg_mix="z", generator=0)
    b = model.sample(torch.tensor([1, 2]), num_iter=3, cfg=3.0, cfg_mix="logits", generator=0)
    assert a["indices"].shape == b["indices"].shape == (2, off.SIDE, off.SIDE, off.C)
    with pytest.raises(ValueError, match="cfg_mix"):
        model.sample(torch.tensor([1]), cfg_mix="eps")


# ---------------------------------------------------------------------------------------------- the command


def test_convert_command_writes_a_loadable_folder(tmp_path, capsys):
    path = tmp_path / "checkpoint-last.pth"
    torch.save(off.tokenbridge_checkpoint(), path)
    out = tmp_path / "tb-l"
    main(["convert", str(tmp_path), str(out), "--num-heads", str(off.HEADS), "--head-num-heads",
          str(off.HEAD_HEADS), "--vae", "kl16:/nowhere/kl16.ckpt"])
    assert "wrote" in capsys.readouterr().out
    model = load_generator(out)
    assert model.provenance["source"]["path"] == str(path) and model.provenance["vae"] == "kl16:/nowhere/kl16.ckpt"
    reference = _tb()
    z, labels, mask = _inputs()
    with torch.no_grad():
        assert torch.equal(model.backbone(z, labels, mask), reference.backbone(z, labels, mask))


# ---------------------------------------------------------------------------------------------- recorded defaults


def test_converted_folders_record_the_released_behaviour_at_any_size(tmp_path, capsys):
    """The test checkpoints' sizes are none of the released ones: the size-independent sampling defaults are
    recorded all the same (the last linear cfg step, sorted positions, cfg on z), the size-dependent ones are named
    in a note; the training objective and the quantizer arithmetic are the released ones."""
    mar, tb = _mar(), _tb()
    assert {"released_cfg": True, "sorted_positions": True, "num_iter": 256}.items() <= mar.provenance["sample"].items()
    assert "cfg" not in mar.provenance["sample"] and "--cfg 2.9" in mar.provenance["source"]["note"]
    assert mar.config["head"]["vb_objective"] == "bits_discretized"
    assert {"cfg_mix": "z", "sorted_positions": True}.items() <= tb.provenance["sample"].items()
    assert "--cfg 3.1" in tb.provenance["source"]["note"]
    assert tb.quantizer.arithmetic == "float32" and tb.config["quantizer"]["arithmetic"] == "float32"
    # the test file's table is the float64 one rounded, not the released float32 computation
    assert tb.provenance["source"]["released_values_match"] is False
    released = off.tokenbridge_checkpoint()
    released["model"]["reconstruction_values"] = released_values(off.LEVELS, 3.0, "clamped")
    assert _tb(released).provenance["source"]["released_values_match"] is True
    path = tmp_path / "mar.pth"
    torch.save(off.mar_checkpoint(), path)
    main(["convert", str(path), str(tmp_path / "mar"), "--num-heads", str(off.HEADS)])
    assert "note: no released evaluation settings" in capsys.readouterr().out
    loaded = load_generator(tmp_path / "mar")
    assert loaded.provenance["sample"]["released_cfg"] is True and loaded.head.vb_objective == "bits_discretized"


def test_known_sizes_get_their_released_cfg(monkeypatch):
    size = (off.D, off.MLP_DEPTH)  # this test checkpoint's (backbone width, diffusion depth), as if it were a released size
    monkeypatch.setitem(PRESETS.MAR_SAMPLING, size, {"cfg": 2.9})
    mar = _mar()
    assert mar.provenance["sample"]["cfg"] == 2.9 and "note" not in mar.provenance["source"]
