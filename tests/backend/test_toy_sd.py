"""toy-sd-64, the first world's trained model shipped in the package: it loads offline through the
model resolver, its text and image towers mean something, and it draws held-out prompts
(shape/colour pairs it never saw) in a way the attribute reader confirms."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from analogon.models.toy import toy_available, toy_path
from analogon.toyworld import evaluate, world
from analogon.toyworld.reader import read

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def toy():
    from analogon.models import LoadOptions, load_bundle

    assert toy_available("toy-sd-64"), "toy-sd-64 is not shipped in backend/analogon/models"
    return load_bundle("toy-sd-64", LoadOptions(device="cpu"))


def test_loads_offline_as_sd1_in_fp32(toy):
    assert toy.family == "sd1" and toy.source == "embedded"
    assert toy.native_size == 64 and toy.vae_scale_factor == 8
    for m in (toy.unet, toy.vae, toy.text_encoder, toy.pipe.image_encoder):
        assert all(p.dtype == torch.float32 for p in m.parameters())
    # decoder self-attention and cross-attention at two resolutions
    attn = [n for n, _ in toy.unet.attn_processors.items() if n.startswith("up_blocks")]
    assert {n.split(".")[1] for n in attn if "attn1" in n} == {"0", "1"}
    assert any("attn2" in n for n in attn)
    # word-level tokenizer: one token per word
    ids = toy.tokenizer("a large red striped circle on a grey background").input_ids
    assert len(ids) == 11
    assert toy.key.startswith("toy-sd:")


def test_clip_space_reads_colour_and_shape():
    """The CLIP saved beside the pipeline (clip/) puts a render nearest its own caption."""
    from transformers import CLIPModel

    from analogon.toyworld.models import images_to_clip_pixels

    clip = CLIPModel.from_pretrained(toy_path("toy-sd-64") / "clip", local_files_only=True,
                                     dtype=torch.float32).eval()
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(toy_path("toy-sd-64") / "tokenizer", local_files_only=True)
    scenes = evaluate.heldout_scenes(10, seed=5)
    hits = 0
    with torch.no_grad():
        for s in scenes:
            options = [world.caption(world.change(s, "colour", c)) for c in world.COLOURS]
            ids = tok(options, padding="max_length", max_length=77, return_tensors="pt").input_ids
            x = torch.from_numpy(world.render(s)).permute(2, 0, 1)[None].float() / 255
            img = clip.get_image_features(pixel_values=images_to_clip_pixels(x))
            txt = clip.get_text_features(input_ids=ids)
            img = getattr(img, "pooler_output", img)
            txt = getattr(txt, "pooler_output", txt)
            sims = torch.nn.functional.cosine_similarity(img, txt)
            hits += list(world.COLOURS)[int(sims.argmax())] == s["colour"]
    assert hits >= 8, f"{hits}/10 renders nearest their own colour's caption"


def test_vae_round_trip_keeps_what_the_reader_reads(toy):
    scenes = evaluate.heldout_scenes(10, seed=13)
    x = torch.from_numpy(np.stack([world.render(s) for s in scenes])).permute(0, 3, 1, 2)
    x = x.float() / 127.5 - 1
    with torch.no_grad():
        rec = toy.vae.decode(toy.vae.encode(x).latent_dist.mean).sample
    out = ((rec.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy().astype(np.uint8)
    reads = [read(im) for im in out]
    for attr in ("colour", "size", "background"):
        assert sum(r[attr] == s[attr] for r, s in zip(reads, scenes)) >= 9, attr
    assert sum(r["shape"] == s["shape"] for r, s in zip(reads, scenes)) >= 5


def test_generates_held_out_prompts_the_reader_confirms(toy):
    """Held-out prompts (shape/colour pairs no training image shows) come out as asked: see
    docs/toyworld.md for the measured table."""
    scenes = evaluate.heldout_scenes(10, seed=11)  # each held-out shape/colour pair twice
    assert {(s["shape"], s["colour"]) for s in scenes} == set(world.HELD_OUT_PAIRS)
    images = evaluate.generate(toy.pipe, [world.caption(s) for s in scenes], seed=0)
    assert all(im.shape == (64, 64, 3) for im in images)
    reads = [read(im) for im in images]
    # Measured on 60 held-out prompts: shape 0.77, colour 0.97, size 1.00, background 1.00
    # (chance: 1/5, 1/6, 1/2, 1/4). Ten samples: allow the binomial spread.
    need = {"shape": 5, "colour": 8, "size": 8, "background": 8}
    for attr, n in need.items():
        ok = sum(r[attr] == s[attr] for r, s in zip(reads, scenes))
        assert ok >= n, (attr, [(s[attr], r[attr]) for r, s in zip(reads, scenes)])
    # the same seed gives the same image (alone or in a batch, up to batched arithmetic)
    again = evaluate.generate(toy.pipe, [world.caption(scenes[0])], seed=0)
    assert np.array_equal(again[0], evaluate.generate(toy.pipe, [world.caption(scenes[0])],
                                                      seed=0)[0])
    assert np.abs(again[0].astype(int) - images[0].astype(int)).mean() < 1.0
    # and the prompt matters: the six colour words on one scene give different colours
    variants = [world.change(scenes[0], "colour", c) for c in world.COLOURS]
    got = [read(im)["colour"] for im in evaluate.generate(
        toy.pipe, [world.caption(v) for v in variants], seed=0)]
    assert len(set(got)) >= 4, got


def test_img2img_at_medium_strength_keeps_shape_colour_and_background(toy):
    # Measured on 60: shape 0.82, colour 0.97, background 1.00.
    scenes = evaluate.heldout_scenes(10, seed=12)
    src = [world.render(s) for s in scenes]
    out = evaluate.img2img(toy.pipe, src, [world.caption(s) for s in scenes], seed=0)
    reads = [read(im) for im in out]
    for attr, n in {"shape": 6, "colour": 8, "background": 8}.items():
        ok = sum(r[attr] == s[attr] for r, s in zip(reads, scenes))
        assert ok >= n, (attr, [(s[attr], r[attr]) for r, s in zip(reads, scenes)])
