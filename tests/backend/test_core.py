"""Shared core: image/map helpers, prompt encoding from input embeddings, diffusion helpers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from analogon.core import diffusion as D
from analogon.core import images as I
from analogon.core import text_embeddings as T
from analogon.errors import InputError


def _rgba(h, w, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (h, w, 4)).astype(np.uint8)


# -- images ---------------------------------------------------------------------------------

def test_place_offsets_and_crops_off_canvas():
    src = np.full((4, 6, 4), 200, np.uint8)
    out = I.place(src, (10, 8), x=7, y=-2)
    assert out.shape == (8, 10, 4)
    # visible part: columns 7..9, rows 0..1
    assert (out[0:2, 7:10] == 200).all()
    assert out[2:, :].sum() == 0 and out[:, :7].sum() == 0


def test_place_scale_and_fully_off_canvas():
    src = np.full((4, 4, 4), 255, np.uint8)
    assert I.place(src, (8, 8), 0, 0, 2.0)[:8, :8, 3].min() == 255
    assert I.place(src, (8, 8), 100, 100).sum() == 0
    with pytest.raises(InputError):
        I.place(src, (8, 8), scale=0)


def test_map_from_rgba_brighter_is_more_change_and_alpha_counts():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 255, 255, 255)
    rgba[0, 1] = (255, 255, 255, 0)  # transparent white = keep
    rgba[1, 0] = (128, 128, 128, 255)
    m = I.map_from_rgba(rgba)
    assert m[0, 0] == pytest.approx(1.0)
    assert m[0, 1] == 0.0 and m[1, 1] == 0.0
    assert 0.45 < m[1, 0] < 0.55


def test_native_size_keeps_aspect_in_latent_multiples():
    assert I.native_size((1000, 500), 512) == (512, 256)
    w, h = I.native_size((333, 1001), 512)
    assert h == 512 and w % 8 == 0 and abs(w / h - 333 / 1001) < 0.02
    assert I.native_size((3, 3), 64) == (64, 64)
    with pytest.raises(InputError):
        I.native_size((0, 5), 64)


def test_tensor_round_trip_is_lossless_for_uint8():
    img = _rgba(8, 8)
    assert np.array_equal(I.from_tensor(I.to_tensor(img)), img[..., :3])


def test_empty_and_size_checks_name_the_problem():
    with pytest.raises(InputError, match="exemplar"):
        I.check_not_empty(np.zeros((4, 4, 4), np.uint8), "exemplar")
    with pytest.raises(InputError, match="same size"):
        I.check_same_size(np.zeros((4, 4, 4), np.uint8), np.zeros((4, 5, 4), np.uint8), "A and A′")


# -- text encoders from input embeddings ------------------------------------------------------

@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sdxl"])
def test_conditioning_from_embeds_equals_encode_prompt(fixture, request):
    bundle = request.getfixturevalue(fixture)
    cond, _ = D.encode_prompt(bundle, "a large red striped circle", image_hw=(64, 96))
    toks = T.prompt_tokens(bundle, "a large red striped circle")
    mine = T.conditioning_from_embeds(bundle, toks.embeds, toks.eos, image_hw=(64, 96))
    assert torch.equal(cond.hidden, mine.hidden)
    if bundle.is_sdxl:
        assert torch.equal(cond.pooled, mine.pooled)
        assert torch.equal(cond.time_ids, mine.time_ids)
    # and the embeddings matter: another prompt differs
    other = T.prompt_tokens(bundle, "a small blue square")
    assert not torch.equal(mine.hidden, T.conditioning_from_embeds(bundle, other.embeds, other.eos).hidden)


def test_conditioning_cat_repeat_and_delta(tiny_sdxl):
    c, u = D.encode_prompt(tiny_sdxl, "x")
    both = D.Conditioning.cat([u, c])
    assert both.batch == 2 and both.pooled.shape[0] == 2 and both.time_ids.shape[0] == 2
    assert c.repeat(3).hidden.shape[0] == 3
    d = c.lerp_delta(c, u, 0.0)
    assert torch.equal(d.hidden, c.hidden) and torch.equal(d.time_ids, c.time_ids)
    d = u.lerp_delta(c, u, 1.0)
    assert torch.allclose(d.hidden, c.hidden, atol=1e-6)


# -- diffusion helpers --------------------------------------------------------------------------

@pytest.mark.parametrize("name", D.SCHEDULER_NAMES)
def test_noised_ignores_begin_index(tiny_sd, name):
    sch = D.make_scheduler(tiny_sd, name, 10)
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    n = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ts = sch.timesteps
    a = D.noised(sch, x0, n, ts[5])
    if hasattr(sch, "set_begin_index"):
        sch.set_begin_index(0)
    b = D.noised(sch, x0, n, ts[5])
    assert torch.equal(a, b)
    # a later timestep in the list is less noisy
    assert (D.noised(sch, x0, n, ts[-1]) - x0).abs().mean() < (a - x0).abs().mean()


def test_img2img_timesteps_strength():
    class S:
        order = 1
        timesteps = torch.arange(10, 0, -1)

    assert D.img2img_timesteps(S, 10, 0.3).tolist() == [3, 2, 1]
    assert len(D.img2img_timesteps(S, 10, 1.0)) == 10
    assert len(D.img2img_timesteps(S, 10, 0.0)) == 0


def test_predict_noise_cfg_batched_equals_two_calls(tiny_sd):
    c, u = D.encode_prompt(tiny_sd, "a red circle")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(500)
    g = D.predict_noise(tiny_sd, x, t, c, u, guidance=4.0)
    ec = D.predict_noise(tiny_sd, x, t, c)
    eu = D.predict_noise(tiny_sd, x, t, u)
    assert torch.allclose(g, eu + 4.0 * (ec - eu), atol=1e-5)


def test_vae_round_trip_shapes(tiny_sdxl):
    img = I.to_tensor(_rgba(40, 56))
    z = D.vae_encode(tiny_sdxl, img)
    assert z.shape == (1, 4, 5, 7)
    assert D.vae_decode(tiny_sdxl, z).shape == (1, 3, 40, 56)


def test_sample_hooks_and_cancel(tiny_sd):
    sch = D.make_scheduler(tiny_sd, "ddim", 4)
    c, u = D.encode_prompt(tiny_sd, "")
    seen = []

    def before(i, t, lat):
        seen.append(int(t))
        return lat

    class Stop(Exception):
        pass

    def on_step(i):
        if i == 2:
            raise Stop

    with pytest.raises(Stop):
        D.sample(tiny_sd, sch, torch.randn(1, 4, 8, 8), sch.timesteps, c, u, 2.0,
                 before_step=before, on_step=on_step)
    assert seen == [int(t) for t in sch.timesteps[:2]]


# -- tiny models ----------------------------------------------------------------------------------

def test_tiny_models_are_deterministic_and_shaped_like_their_families(tiny_sd, tiny_sdxl):
    from analogon.models import load_bundle

    again = load_bundle("tiny-sd")
    for (k, v), (k2, v2) in zip(tiny_sd.unet.state_dict().items(), again.unet.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert tiny_sd.family == "sd1" and tiny_sdxl.family == "sdxl"
    assert tiny_sd.vae_scale_factor == 8 and tiny_sdxl.vae_scale_factor == 8
    names = [n for n, _ in tiny_sd.unet.attn_processors.items()]
    assert any(n.startswith("up_blocks.") and "attn1" in n for n in names)
    assert tiny_sdxl.unet.config.addition_embed_type == "text_time"


def test_native_size_comes_from_the_model_not_its_name(tiny_sd, tmp_path):
    from analogon.models import load_bundle

    assert tiny_sd.native_size == 64
    tiny_sd.pipe.save_pretrained(tmp_path / "copy")
    assert load_bundle(str(tmp_path / "copy")).native_size == 64


def test_an_exemplar_at_exactly_half_opacity_is_pasted_at_the_default_threshold():
    """Krita stores a layer's "50 %" as 127 or 128 of 255: both pass a threshold of 0.5, and
    one level less does not."""
    from analogon.core.surgery import paste_pixels

    alpha = np.array([[126, 127, 128, 255]], np.float32) / 255.0
    assert paste_pixels(alpha, None, 0.5, 1.0).tolist() == [[False, True, True, True]]
