"""tokenbridge.official: the weight rewrites are exact, a converted folder loads into the plain classes without
the package, and no core module keeps an option that only released checkpoints need."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import official_format as off
import pytest
import torch
import torch.nn.functional as F

from tokenbridge.checkpoint import load_generator
from tokenbridge.diffusion import DiffusionHead, drop_retired_options
from tokenbridge.heads import DimensionwiseARHead
from tokenbridge.layers import modulate
from tokenbridge.official import convert_mar, convert_tokenbridge
from tokenbridge.official.layout import fold_affine_norms, swap_halves

PACKAGE = Path(__file__).resolve().parents[2] / "tokenbridge"
ATOL = 2e-5  # float32 rounding, as tests/official/test_convert.py
# options (and modules) that existed only so that released checkpoints load, removed by the weight rewrites
RELEASED_ONLY = ("affine_block_norm", "final_chunks", "affine_norm", "exact_gelu", "first_token_timestep",
                 "OfficialARHead", "official_head", "shift_scale")
# the command line fronts the converter: it imports it and passes on its --no-first-token-timestep flag
CONVERTER_FRONTS = {"cli.py", "cli_parser.py"}


def _released_only_mentions(source: str, name: str) -> list[str]:
    """What a core module's source says that only released checkpoints need: the removed options' names and
    imports of tokenbridge.official. diffusion.py's table of retired config keys (`_RETIRED`, what old configs
    recorded at the plain value) is allowed to name them."""
    if name in CONVERTER_FRONTS:
        return []
    lines = [ln for ln in source.splitlines() if not ln.startswith("_RETIRED = ")]
    text = "\n".join(lines)
    found = [w for w in RELEASED_ONLY if re.search(rf"\b{w}\b", text)]
    found += re.findall(r"^\s*(?:from|import)\s+(?:tokenbridge\.official|\.+official)\b.*$", text, re.M)
    return found


def test_the_rule_catches_a_released_only_option():
    assert _released_only_mentions("def f(x, affine_block_norm=False):\n    pass\n", "x.py") == ["affine_block_norm"]
    assert _released_only_mentions("from ..official.head import Head\n", "x.py") == ["from ..official.head import Head"]
    assert _released_only_mentions("import tokenbridge.official as o\n", "x.py")
    assert not _released_only_mentions('_RETIRED = {"affine_block_norm": False}\n', "diffusion.py")


CORE = [p for p in sorted(PACKAGE.rglob("*.py")) if p.relative_to(PACKAGE).parts[0] != "official"]


def test_the_core_module_list_is_the_package():
    assert len(CORE) > 40 and PACKAGE / "generators" / "tokenbridge.py" in CORE


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_core_modules_keep_no_released_only_option(path):
    assert _released_only_mentions(path.read_text(), path.name) == [], path


# ---------------------------------------------------------------------------------------------- the rewrites


def test_folding_an_affine_norm_into_the_modulation_is_exact_in_float64():
    g = torch.Generator().manual_seed(0)
    width, cond_width, n = 12, 7, 9
    weight, bias = torch.randn(6 * width, cond_width, generator=g, dtype=torch.float64), \
        torch.randn(6 * width, generator=g, dtype=torch.float64)
    affine = [torch.randn(width, generator=g, dtype=torch.float64) for _ in range(4)]  # g1, b1, g2, b2
    x, c = torch.randn(n, width, generator=g, dtype=torch.float64), torch.randn(n, cond_width, generator=g,
                                                                                  dtype=torch.float64)
    slots = [(0, 1), (3, 4)]
    mod = F.linear(c, weight, bias).chunk(6, -1)
    folded = F.linear(c, fold_affine_norms(weight, 6, slots, affine), fold_affine_norms(bias, 6, slots, affine))
    folded = folded.chunk(6, -1)
    for k, (shift, scale) in enumerate(slots):
        released = modulate(F.layer_norm(x, (width,), affine[2 * k], affine[2 * k + 1], 1e-6), mod[shift], mod[scale])
        plain = modulate(F.layer_norm(x, (width,), None, None, 1e-6), folded[shift], folded[scale])
        torch.testing.assert_close(plain, released, atol=1e-12, rtol=0)
    for k in (2, 5):  # the gates are untouched
        assert torch.equal(folded[k], mod[k])
    swapped = swap_halves(torch.arange(6.0))
    assert swapped.tolist() == [3.0, 4.0, 5.0, 0.0, 1.0, 2.0]


# ---------------------------------------------------------------------------------------------- converted folders


def _block_official(monkeypatch):
    """Make any import of tokenbridge.official fail, as in a process that never imported it."""
    for name in [m for m in sys.modules if m == "tokenbridge.official" or m.startswith("tokenbridge.official.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tokenbridge.official", None)


def test_converted_tokenbridge_folder_loads_into_the_plain_classes_with_the_released_outputs(tmp_path, monkeypatch):
    ckpt = off.tokenbridge_checkpoint(6)
    convert_tokenbridge(ckpt, num_heads=off.HEADS, head_num_heads=off.HEAD_HEADS).save_pretrained(tmp_path / "tb")
    head_config = json.loads((tmp_path / "tb" / "config.json").read_text())["config"]["head"]
    assert head_config["kind"] == "ar" and not set(head_config) & set(RELEASED_ONLY)
    _block_official(monkeypatch)
    model = load_generator(tmp_path / "tb")
    assert type(model.head) is DimensionwiseARHead
    sd, g = ckpt["model_ema"], torch.Generator().manual_seed(6)
    z = torch.randn(5, off.D, generator=g)
    indices = torch.randint(0, off.LEVELS, (5, off.C), generator=g)
    classes = indices[:, off.ORDER]
    with torch.no_grad():
        torch.testing.assert_close(model.head.step_logits(z, indices), off.ref_head(sd, z, classes, False),
                                   atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(model.head.sampling_logits(z, indices), off.ref_head(sd, z, classes, True),
                                   atol=ATOL, rtol=1e-5)


def test_converted_mar_folder_loads_into_the_plain_classes_with_the_released_outputs(tmp_path, monkeypatch):
    ckpt = off.mar_checkpoint(7)
    convert_mar(ckpt, num_heads=off.HEADS).save_pretrained(tmp_path / "mar")
    _block_official(monkeypatch)
    model = load_generator(tmp_path / "mar")
    assert type(model.head) is DiffusionHead and not any(b.norm.elementwise_affine for b in model.head.blocks)
    g = torch.Generator().manual_seed(7)
    x, c = torch.randn(6, off.C, generator=g), torch.randn(6, off.D, generator=g)
    t = torch.tensor([0, 5, 999, 500, 17, 250])
    with torch.no_grad():
        eps, v = model.head.denoise(x, t, model.head.z_cond(c))
        torch.testing.assert_close(torch.cat([eps, v], 1), off.ref_mlp(ckpt["model_ema"], x, t, c), atol=1e-4,
                                   rtol=1e-5)


def test_configs_recorded_before_the_rewrites():
    """Configs written before carry the retired options at the plain value (dropped); a folder converted before
    the rewrites carries the released value, which only a new conversion turns into weights."""
    assert drop_retired_options({"width": 8, "affine_block_norm": False, "final_chunks": "scale_shift"}) == {"width": 8}
    with pytest.raises(ValueError, match="affine_block_norm=True.*tokenbridge convert again"):
        drop_retired_options({"affine_block_norm": True})
    with pytest.raises(ValueError, match="final_chunks='shift_scale'"):
        drop_retired_options({"final_chunks": "shift_scale"})


def test_the_plain_head_options_that_stay():
    """gelu and final_norm are options of every channel head; a wrong activation name is named before any work."""
    exact = DimensionwiseARHead(8, 4, 8, width=16, depth=1, num_heads=2, gelu="exact", final_norm=True)
    assert exact.blocks[0].mlp[1].approximate == "none" and exact.final_norm.elementwise_affine
    plain = DimensionwiseARHead(8, 4, 8, width=16, depth=1, num_heads=2)
    assert plain.blocks[0].mlp[1].approximate == "tanh" and not any("final_norm" in k for k in plain.state_dict())
    with pytest.raises(ValueError, match="gelu must be one of"):
        DimensionwiseARHead(8, 4, 8, width=16, depth=1, num_heads=2, gelu="erf")
