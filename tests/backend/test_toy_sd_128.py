"""toy-sd, the 128-px world's trained model shipped in the package and the model the project
measures on: it loads offline through the model resolver as an SD 1.x pipeline with a 16x16
latent and attention at 16x16 and 8x8, its quality cases are drawn in its own world, and it
draws held-out prompts (shape/colour pairs no training caption holds) in a way the reader
confirms, per object."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from analogon.models.toy import model_world, toy_available
from analogon.toyworld import evaluate, world

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not toy_available("toy-sd"), reason="toy-sd is not shipped")]


@pytest.fixture(scope="module")
def toy():
    from analogon.models import LoadOptions, load_bundle

    return load_bundle("toy-sd", LoadOptions(device="cpu"))


def test_loads_offline_as_sd1_at_128_with_attention_at_16_and_8(toy):
    assert toy.family == "sd1" and toy.source == "embedded" and toy.key.startswith("toy-sd:")
    assert toy.native_size == 128 and toy.vae_scale_factor == 8
    assert model_world("toy-sd") == "toy128" and model_world("toy-sd-64") == "toy64"
    for m in (toy.unet, toy.vae, toy.text_encoder, toy.pipe.image_encoder):
        assert all(p.dtype == torch.float32 for p in m.parameters())
    # Self- and cross-attention at both latent sizes in the encoder, the mid-block and the
    # decoder (16x16 and 8x8 here, as SD 1.5 has them at 64/32/16/8): count the tokens each
    # attention layer sees in one forward pass.
    seen: dict[str, int] = {}

    def spy(name):
        def hook(module, args, kwargs):
            seen[name] = args[0].shape[1] if args else kwargs["hidden_states"].shape[1]
        return hook

    handles = [m.register_forward_pre_hook(spy(n), with_kwargs=True)
               for n, m in toy.unet.named_modules() if n.endswith(("attn1", "attn2"))]
    try:
        with torch.no_grad():
            toy.unet(torch.zeros(1, 4, 16, 16), 10,
                     torch.zeros(1, 77, toy.unet.config.cross_attention_dim))
    finally:
        for h in handles:
            h.remove()
    for part in ("down_blocks", "mid_block", "up_blocks"):
        for kind in ("attn1", "attn2"):
            sizes = {v for k, v in seen.items() if k.startswith(part) and k.endswith(kind)}
            assert sizes == ({64} if part == "mid_block" else {256, 64}), (part, kind, sizes)


def test_generates_held_out_prompts_the_reader_confirms_per_object(toy):
    """Held-out pairs drawn as asked (docs/toyworld.md has the table on 60 prompts, two
    sets); twelve prompts with fifteen objects, thresholds two objects below what the shipped
    model gets (shape 13 of 15, colour 15, texture 12, the held-out pair 11 of 12). A model
    that ignores the prompt, or binds words to nothing, reads at chance (shape 0.2)."""
    scenes = evaluate.heldout_scenes(12, seed=1250, world="toy128")
    images = evaluate.generate(toy.pipe, [world.caption(s) for s in scenes], seed=0)
    assert all(im.shape == (128, 128, 3) for im in images)
    got = evaluate.score(images, scenes)
    for attr, need in NEED_GENERATION.items():
        assert got[attr] >= need, (attr, got)


def test_img2img_at_half_strength_keeps_every_object_attribute(toy):
    # the same scenes: every object attribute right on all fifteen objects
    scenes = evaluate.heldout_scenes(12, seed=1250, world="toy128")
    out = evaluate.img2img(toy.pipe, [world.render(s) for s in scenes],
                           [world.caption(s) for s in scenes], seed=0)
    got = evaluate.score(out, scenes)
    for attr, need in NEED_IMG2IMG.items():
        assert got[attr] >= need, (attr, got)


NEED_GENERATION = {"shape": 11 / 15, "colour": 13 / 15, "size": 13 / 15, "texture": 10 / 15,
                   "shape_and_colour": 9 / 12, "background": 10 / 12}
NEED_IMG2IMG = {"shape": 13 / 15, "colour": 13 / 15, "size": 13 / 15, "texture": 13 / 15,
                "background": 11 / 12}


def test_vae_round_trip_is_the_ceiling_the_targets_ask_for(toy):
    scenes = evaluate.heldout_scenes(12, seed=1242, world="toy128")
    got = evaluate.score_objects(evaluate.vae_round_trip(toy.vae, scenes), scenes)
    for attr in ("shape", "colour", "texture", "size", "background"):
        assert got[attr] >= 0.95, (attr, got)
    assert np.isfinite(got["backdrop"])
