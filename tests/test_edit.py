"""Editing with every family: the kept region survives bit for bit, the edge cases reduce to plain sampling or to
the encoded image, and bad requests are named before any work."""

from __future__ import annotations

import pytest
import torch

from tokenbridge.generators import ContinuousMARGenerator, D2CGenerator, TokenBridgeGenerator

N, C, H, W = 3, 4, 8, 8
FAST = {"num_iter": 4, "cfg": 2.0}
OPTIONS = {"tokenbridge": FAST, "mar": {**FAST, "num_sampling_steps": 5},
           "d2c": {**FAST, "num_sampling_steps": 5, "stage1_cfg": 1.5}}


def tiny(family: str, patch_size: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "d2c":
        return D2CGenerator.from_config({"preset": "tiny"}).eval()
    cls = TokenBridgeGenerator if family == "tokenbridge" else ContinuousMARGenerator
    return cls.from_config({"preset": "tiny", "backbone": {"patch_size": patch_size}}).eval()


def latents(n: int = N, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, C, H, W, generator=torch.Generator().manual_seed(seed))


def right_half(n: int = N) -> torch.Tensor:
    keep = torch.zeros(n, H, W, dtype=torch.bool)
    keep[:, :, : W // 2] = True
    return keep


def kept_reference(model: torch.nn.Module, known: torch.Tensor) -> torch.Tensor:
    """What the encoded image's tokens decode to: TokenBridge keeps quantizer indices, the others the latents."""
    if model.family != "tokenbridge":
        return known
    return model.quantizer.dequantize(model.quantizer.quantize(known.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)


LABELS = torch.tensor([0, 3, 7])
FAMILIES = ["tokenbridge", "mar", "d2c"]


@pytest.mark.parametrize("family", FAMILIES)
def test_kept_tokens_are_bit_identical_and_the_rest_is_generated(family):
    model, known, keep = tiny(family), latents(), right_half()
    out = model.sample(LABELS, generator=0, known=known, known_mask=keep, **OPTIONS[family])
    ref = kept_reference(model, known)
    assert torch.equal(out["latents"].permute(0, 2, 3, 1)[keep], ref.permute(0, 2, 3, 1)[keep])
    assert not torch.equal(out["latents"].permute(0, 2, 3, 1)[~keep], ref.permute(0, 2, 3, 1)[~keep])
    assert bool(torch.isfinite(out["latents"]).all())
    if family == "tokenbridge":  # the kept indices themselves, not only their values
        indices = model.quantizer.quantize(known.permute(0, 2, 3, 1))
        assert torch.equal(out["indices"][keep], indices[keep])
        assert bool((out["confidence"][keep] == 0).all()) and bool((out["confidence"][~keep] < 0).all())
    if family == "d2c":  # codes of the cells wholly kept come from the source, as it encodes the kept latents
        given = model.source.encode(known.permute(0, 2, 3, 1))
        assert torch.equal(out["codes"][:, :, :2], given[:, :, :2])


@pytest.mark.parametrize("family", FAMILIES)
def test_nothing_kept_is_plain_sampling_bit_for_bit(family):
    model = tiny(family)
    plain = model.sample(LABELS, generator=7, **OPTIONS[family])
    edited = model.sample(LABELS, generator=7, known=latents(), known_mask=torch.zeros(N, H, W, dtype=torch.bool),
                          **OPTIONS[family])
    assert plain.keys() == edited.keys()
    assert all(torch.equal(plain[k], edited[k]) for k in plain)


@pytest.mark.parametrize("family", FAMILIES)
def test_everything_kept_returns_the_encoded_image_without_sampling(family, monkeypatch):
    model, known = tiny(family), latents()
    for head in (model.stage1, model.stage2.head) if family == "d2c" else (model.head,):
        monkeypatch.setattr(head, "sample", lambda *a, **k: pytest.fail("a head sampled"))
    steps = []
    out = model.sample(LABELS, generator=0, known=known, known_mask=torch.ones(N, H, W, dtype=torch.bool),
                       callback=steps.append, **OPTIONS[family])
    assert torch.equal(out["latents"], kept_reference(model, known)) and steps == []  # no MAR step ran
    if family == "d2c":
        assert torch.equal(out["codes"], model.source.encode(known.permute(0, 2, 3, 1)))


@pytest.mark.parametrize("family", ["tokenbridge", "mar"])
def test_confidence_order_and_random_order_both_keep_the_region(family):
    model, known, keep = tiny(family), latents(), right_half()
    orders = ["random", "confidence"] if family == "tokenbridge" else ["random"]
    for order in orders:
        extra = {"order": order} if family == "tokenbridge" else {}
        steps = []
        out = model.sample(LABELS, generator=1, known=known, known_mask=keep, callback=steps.append,
                           **OPTIONS[family], **extra)
        ref = kept_reference(model, known)
        assert torch.equal(out["latents"].permute(0, 2, 3, 1)[keep], ref.permute(0, 2, 3, 1)[keep])
        # the loop's steps are spread over the 32 unknown tokens: 4 steps, the kept ones visible from the first
        assert [int(s["step"]) for s in steps] == [1, 2, 3, 4]
        assert not bool(steps[0]["mask"][keep].any()) and bool(steps[0]["mask"][~keep].any())
        assert not bool(steps[-1]["mask"].any())


def test_a_patched_generator_keeps_whole_patches_and_refuses_a_mask_splitting_one():
    model, known = tiny("mar", patch_size=2), latents()
    keep = torch.zeros(N, H, W, dtype=torch.bool)
    keep[:, 2:6, 2:6] = True  # the center 2x2 patches: outpainting
    out = model.sample(LABELS, generator=0, known=known, known_mask=keep, **OPTIONS["mar"])
    assert torch.equal(out["latents"].permute(0, 2, 3, 1)[keep], known.permute(0, 2, 3, 1)[keep])
    keep[:, 1, 1] = True  # one latent of a 2x2 patch
    with pytest.raises(ValueError, match="does not fit the token grid: 3 of the 2x2 latent patches"):
        model.sample(LABELS, known=known, known_mask=keep, **OPTIONS["mar"])


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_edit_requests_are_named_before_any_work(family, monkeypatch):
    model = tiny(family)

    def no_work(*args, **kwargs):
        raise AssertionError("sampling started")

    if family == "d2c":
        monkeypatch.setattr(model.stage1, "sample", no_work)
    else:
        monkeypatch.setattr(model, "_generate", no_work)
    known, keep = latents(), right_half()
    bad = [({"known": known}, "go together"),
           ({"known": known.long(), "known_mask": keep}, "known must be a float tensor"),
           ({"known": known[:2], "known_mask": keep}, r"known must be latents \[N=3, C=4, 8, 8\]"),
           ({"known": known[..., :4], "known_mask": keep}, "got shape"),
           ({"known": known[:, :3], "known_mask": keep}, "known has 3 channels, this generator's latents have 4"),
           ({"known": known, "known_mask": keep.float()}, "known_mask must be a bool tensor"),
           ({"known": known, "known_mask": keep[:, :, :4]}, r"known_mask must be \[N=3, 8, 8\]"),
           ({"known": known, "known_mask": torch.ones(N, 32, 32, dtype=torch.bool)}, "image-resolution mask"),
           ({"known": known.clone().fill_(float("nan")), "known_mask": keep}, "non-finite"),
           ({"known": known, "known_mask": torch.cat([keep[:2], torch.zeros(1, H, W, dtype=torch.bool)])},
            "different numbers of tokens")]
    for request, message in bad:
        with pytest.raises(ValueError, match=message):
            model.sample(LABELS, **request, **OPTIONS[family])


def test_forced_codes_condition_later_codes_and_keep_the_random_stream():
    model = tiny("d2c")
    gpt, labels = model.stage1, torch.tensor([1, 2])
    torch.manual_seed(0)
    with torch.no_grad():  # an untrained GPT's zero-initialised output layer would ignore the codes before
        for p in gpt.parameters():
            p.normal_(0, 0.3)
    plain = gpt.sample(labels, generator=torch.Generator().manual_seed(3), cfg=1.5)
    known = torch.randint(0, model.codebook_size, plain.shape, generator=torch.Generator().manual_seed(4))
    mask = torch.zeros_like(plain, dtype=torch.bool)
    mask[:, 8:] = True
    forced = gpt.sample(labels, generator=torch.Generator().manual_seed(3), cfg=1.5, known=known, known_mask=mask)
    assert torch.equal(forced[:, :8], plain[:, :8]) and torch.equal(forced[:, 8:], known[:, 8:])
    mask[:, :] = False
    mask[:, 0] = True  # a forced first code changes what follows
    first = gpt.sample(labels, generator=torch.Generator().manual_seed(3), cfg=1.5, known=known, known_mask=mask)
    assert first[:, 0].tolist() == known[:, 0].tolist() and not torch.equal(first[:, 1:], plain[:, 1:])
    uncached = gpt.sample(labels, generator=torch.Generator().manual_seed(3), cfg=1.5, known=known, known_mask=mask,
                          use_cache=False)
    assert torch.equal(uncached, first)
