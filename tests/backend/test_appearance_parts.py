"""The appearance method's parts: masked AdaIN, FreeU on/off, k-means self-segmentation, the
step schedule (paper vs authors' index semantics, guidance decay)."""
from __future__ import annotations

import pytest
import torch

from analogon.core.adain import adain, channel_stats
from analogon.core.freeu import authors_backbone, fourier_filter, freeu, stage_channels
from analogon.core.selfseg import kmeans, object_mask, to_latent, token_positions
from analogon.methods.appearance import AppearanceParams, Schedule


def test_adain_whole_image_matches_statistics():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(1, 4, 8, 8, generator=g) * 2 + 1
    s = torch.randn(1, 4, 8, 8, generator=g) * 0.5 - 3
    out = adain(c, s)
    m_o, s_o = channel_stats(out)
    m_s, s_s = channel_stats(s)
    assert torch.allclose(m_o, m_s, atol=1e-5) and torch.allclose(s_o, s_s, atol=1e-4)


def test_masked_adain_uses_masked_statistics_and_keeps_the_outside():
    g = torch.Generator().manual_seed(1)
    c = torch.randn(1, 4, 8, 8, generator=g)
    s = torch.randn(1, 4, 8, 8, generator=g)
    cm = torch.zeros(1, 1, 8, 8)
    cm[..., 2:6, 2:6] = 1
    sm = torch.zeros(1, 1, 8, 8)
    sm[..., :4, :] = 1
    s[..., :4, :] = s[..., :4, :] * 3 + 5  # the appearance object: bright, high contrast
    out = adain(c, s, cm, sm)
    assert torch.equal(out[..., cm[0, 0] == 0], c[..., cm[0, 0] == 0])
    inside = out[..., 2:6, 2:6].reshape(4, -1)
    ref = s[..., :4, :].reshape(4, -1)
    assert torch.allclose(inside.mean(1), ref.mean(1), atol=1e-4)
    assert torch.allclose(inside.std(1, unbiased=False), ref.std(1, unbiased=False), atol=1e-3)
    # an empty mask falls back to the whole image for the statistics
    m, _ = channel_stats(s, torch.zeros(1, 1, 8, 8))
    assert torch.allclose(m, s.mean(dim=(2, 3), keepdim=True), atol=1e-6)


def test_freeu_on_and_restored(tiny_sd):
    unet = tiny_sd.unet
    assert getattr(unet.up_blocks[0], "b1", None) is None
    with freeu(unet, "diffusers", 0.9, 0.2, 1.2, 1.4):
        assert unet.up_blocks[1].b1 == 1.2 and unet.up_blocks[1].s2 == 0.2
    assert all(getattr(b, "b1", None) is None for b in unet.up_blocks)
    unet.enable_freeu(s1=0.5, s2=0.5, b1=1.1, b2=1.1)
    try:
        with freeu(unet, None):
            assert unet.up_blocks[0].b1 is None
        with freeu(unet, "authors"):  # the two operators never stack
            assert unet.up_blocks[0].b1 is None
        assert unet.up_blocks[0].b1 == 1.1  # a user's own setting comes back
    finally:
        unet.disable_freeu()


def test_fourier_filter_scales_only_the_lowest_frequencies():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 8, 8, generator=g)
    assert torch.allclose(fourier_filter(x, 1, 1.0), x, atol=1e-5)
    # a constant image is all zero frequency: scaled by s
    c = torch.full((1, 1, 8, 8), 3.0)
    assert torch.allclose(fourier_filter(c, 1, 0.2), c * 0.2, atol=1e-5)
    # the highest frequency (a checkerboard) is outside the box: untouched
    yy, xx = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    checker = ((yy + xx) % 2 * 2 - 1).float()[None, None]
    assert torch.allclose(fourier_filter(checker, 1, 0.2), checker, atol=1e-5)


def _up_inputs(unet, run):
    """The backbone input (hidden_states) of every up block during ``run()``."""
    seen = []
    hooks = [b.register_forward_pre_hook(
        lambda m, a, kw, i=i: seen.append((i, kw["hidden_states"].detach().clone())), with_kwargs=True)
        for i, b in enumerate(unet.up_blocks)]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("bundle_name", ["tiny_sd", "tiny_sdxl"])
def test_authors_freeu_filters_the_backbone_of_the_deep_up_blocks(bundle_name, request):
    """The authors' operator: every up block whose input has the deepest or next channel count
    gets its backbone scaled (first half × b) and low-pass damped (× s); the skips are not touched;
    the UNet is itself again after the block."""
    bundle = request.getfixturevalue(bundle_name)
    unet = bundle.unet
    c1, c2 = stage_channels(unet)
    torch.manual_seed(0)
    x = torch.randn(1, 4, 8, 8)
    from analogon.core.diffusion import encode_prompt
    cond, _ = encode_prompt(bundle, "a shape", "", image_hw=(64, 64))
    kw = cond.unet_kwargs()

    def run():
        with torch.no_grad():
            return unet(x, 500, **kw).sample

    plain = run()
    with freeu(unet, "authors", s1=0.9, s2=0.2, b1=1.2, b2=1.4):
        # the hook sits before any other pre-hook registered afterwards: record what blocks get
        inputs = _up_inputs(unet, run)
        out = run()
    assert not torch.allclose(out, plain)
    assert torch.equal(run(), plain)  # hooks removed
    touched = 0
    with torch.no_grad():
        base_inputs = _up_inputs(unet, run)
    for (i, got), (_, h) in zip(inputs, base_inputs):
        if i == 0:
            assert h.shape[1] == c1  # the mid block's output has the deepest channel count
        bs = {c1: (1.2, 0.9), c2: (1.4, 0.2)}.get(h.shape[1])
        if bs is None or i > 0:
            continue  # later inputs depend on earlier changes; block 0 is compared exactly
        assert torch.allclose(got, authors_backbone(h, *bs), atol=1e-5)
        touched += 1
    assert touched == 1
    n_stage = sum(1 for _, h in base_inputs if h.shape[1] in (c1, c2))
    assert n_stage >= 2  # SD-shaped: 1280 ×3 + 640 ×1; SDXL-shaped: 1280 ×2 + 640 ×1


def _two_blobs(h=8, w=8):
    """A toy self-attention map: pixels of the left half attend to the left half, others to the
    right half; plus a noun map that is high on the left."""
    left = torch.zeros(h, w)
    left[:, : w // 2] = 1
    feats = torch.where(left.reshape(-1, 1) > 0, left.reshape(1, -1), 1 - left.reshape(1, -1))
    feats = feats / feats.sum(1, keepdim=True)
    return feats, left


def test_kmeans_is_deterministic_and_separates():
    feats, left = _two_blobs()
    a = kmeans(feats, 2, seed=0)
    b = kmeans(feats, 2, seed=0)
    assert torch.equal(a, b)
    lab = a.reshape(8, 8)
    assert (lab[left > 0] == lab[0, 0]).all() and (lab[left == 0] != lab[0, 0]).all()


def test_object_mask_picks_the_noun_segment():
    feats, left = _two_blobs()
    noun = left.reshape(-1) * 0.8 + 0.1
    m = object_mask(feats, (8, 8), noun, k=2)
    assert torch.equal(m, left)
    assert object_mask(feats, (8, 8), None, k=2).sum() == 0  # no noun: no mask
    up = to_latent(m, (16, 16))
    assert up.shape == (1, 1, 16, 16) and set(up.unique().tolist()) <= {0.0, 1.0}


def _segments_map(labels: torch.Tensor) -> torch.Tensor:
    """A self-attention map in which every cell attends evenly to the cells of its own label."""
    flat = labels.reshape(-1)
    feats = (flat[:, None] == flat[None, :]).float()
    return feats / feats.sum(1, keepdim=True)


def test_object_mask_rules_use_the_border_and_the_noun():
    # a backdrop (0) around a subject (1) whose lower part (2) is cut by the frame's bottom edge
    labels = torch.zeros(8, 8, dtype=torch.long)
    labels[2:5, 2:6] = 1
    labels[5:, 2:6] = 2
    feats = _segments_map(labels)
    subject = (labels > 0).float()
    good_noun = subject.reshape(-1) * 0.8 + 0.1
    bad_noun = (labels == 0).float().reshape(-1)  # a word the encoder does not know: the backdrop
    # the paper's rule follows the noun, right or wrong
    assert torch.equal(object_mask(feats, (8, 8), good_noun, k=3, rule="noun"), subject)
    assert torch.equal(object_mask(feats, (8, 8), bad_noun, k=3, rule="noun"), (labels == 0).float())
    # the boundary prior alone: only the part off the border
    inner = (labels == 1).float()
    assert torch.equal(object_mask(feats, (8, 8), bad_noun, k=3, rule="border"), inner)
    # auto: the part off the border, plus the cut part where the noun picks it, never the backdrop
    assert torch.equal(object_mask(feats, (8, 8), good_noun, k=3, rule="auto"), subject)
    assert torch.equal(object_mask(feats, (8, 8), bad_noun, k=3, rule="auto"), inner)
    assert torch.equal(object_mask(feats, (8, 8), None, k=3, rule="auto"), inner)
    # every segment on the border (left | right halves): auto is the noun rule
    feats2, left = _two_blobs()
    assert torch.equal(object_mask(feats2, (8, 8), left.reshape(-1), k=2, rule="auto"), left)
    with pytest.raises(ValueError):
        object_mask(feats, (8, 8), good_noun, k=3, rule="nearest")


def test_token_positions(tiny_sd):
    pos = token_positions(tiny_sd.tokenizer, "A photo of a cat", "cat")
    ids = tiny_sd.tokenizer("A photo of a cat").input_ids
    sub = tiny_sd.tokenizer("cat", add_special_tokens=False).input_ids
    assert pos and [ids[i] for i in pos] == sub
    assert token_positions(tiny_sd.tokenizer, "A photo of a cat", "zebra") == []


def test_schedule_authors_vs_paper_semantics():
    a = Schedule(AppearanceParams())  # 100 steps, 32 skipped: 68 run
    assert a.n == 68
    # authors' code: ranges index the 68 remaining steps, so 10..90 and 10..70 both run to the end
    assert [j for j in range(68) if a.fine(j)] == list(range(10, 68))
    assert [j for j in range(68) if a.coarse(j)] == list(range(10, 68))
    assert [j for j in range(68) if a.inject(j)] == [0, 5, 10, 15, 20, 25, 30, 35]
    assert [j for j in range(68) if a.adain(j)] == list(range(20, 68))
    assert a.alpha(0) == pytest.approx(3.5) and a.alpha(67) == pytest.approx(1.75)
    p = Schedule(AppearanceParams(range_semantics="paper", guidance_decay=False))
    # paper: positions in the full schedule; step j is step 32 + j
    assert [j for j in range(68) if p.fine(j)] == list(range(0, 90 - 32))
    assert [j for j in range(68) if p.coarse(j)] == list(range(0, 70 - 32))
    assert [j for j in range(68) if p.inject(j)] == [3]  # step 35 (step 40 is not below 40)
    assert all(p.alpha(j) == 3.5 for j in range(68))
    # fewer steps: ranges scale with the schedule
    s = Schedule(AppearanceParams(steps=50, skip_steps=16))
    assert [j for j in range(34) if s.fine(j)] == list(range(5, 34))


def test_params_validation():
    with pytest.raises(ValueError):
        AppearanceParams(steps=10, skip_steps=10)
    with pytest.raises(ValueError):
        AppearanceParams(fine_start=50, fine_end=40)
    with pytest.raises(ValueError):
        AppearanceParams(unknown=1)
