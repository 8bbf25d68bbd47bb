"""CLIP spaces: slerp, text features from input embeddings, loading from folders, matching a
model's text encoders. Tiny CLIPs only (built offline); nothing touches the network."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from analogon.core import clip_space as cs
from analogon.errors import InputError, ModelError


@pytest.fixture(scope="module")
def open_tiny():
    return cs.tiny_open_clip(seed=3)


def _img(seed, h=40, w=56):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 4), dtype=np.uint8)


# -- slerp ----------------------------------------------------------------------------------

def test_slerp_endpoints_are_the_two_directions():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, generator=g) * 3, torch.randn(16, generator=g) * 0.2
    assert torch.allclose(cs.slerp(a, b, 0.0), a / a.norm(), atol=1e-6)
    assert torch.allclose(cs.slerp(a, b, 1.0), b / b.norm(), atol=1e-6)


def test_slerp_moves_along_the_great_circle():
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 5.0, 0.0])
    for alpha in (0.25, 0.5, 0.8):
        s = cs.slerp(a, b, alpha)
        assert s.norm().item() == pytest.approx(1.0, abs=1e-6)
        angle_a = math.degrees(math.acos(float(s @ a)))
        assert angle_a == pytest.approx(90 * alpha, abs=1e-3)


def test_slerp_of_parallel_vectors_does_not_divide_by_zero():
    a = torch.tensor([0.0, 2.0])
    s = cs.slerp(a, 3 * a, 0.5)
    assert torch.isfinite(s).all() and torch.allclose(s, torch.tensor([0.0, 1.0]))


# -- transformers CLIP around a model's text encoder -----------------------------------------------

def test_tiny_clip_reads_the_text_encoder_exactly(tiny_sd):
    space = cs.clip_spaces_for(tiny_sd)[0]
    assert space.match(tiny_sd.text_encoder) == 2
    texts = ["a red circle", "blue"]
    ids = space.tokenize(texts)
    ref = space.model.get_text_features(input_ids=ids)
    ref = ref if torch.is_tensor(ref) else ref.pooler_output
    assert torch.equal(space.text_features(texts), ref.float())
    one = space.features_with_tokens("a red circle", None)
    assert torch.allclose(one, ref[:1], atol=1e-5)
    assert space.image_features([_img(0), _img(1, 64, 30)]).shape == (2, space.dim)


def test_inserted_tokens_are_differentiable_and_change_the_features(tiny_sd):
    space = cs.clip_spaces_for(tiny_sd)[0]
    extra = torch.zeros(3, space.text_width, requires_grad=True)
    f = space.features_with_tokens("a red circle", extra)
    f.sum().backward()
    assert extra.grad is not None and extra.grad.abs().sum() > 0
    assert not torch.allclose(f, space.features_with_tokens("a red circle", None))


def test_sdxl_gets_one_space_per_text_encoder(tiny_sdxl):
    spaces = cs.clip_spaces_for(tiny_sdxl)
    assert len(spaces) == 2 and spaces[0] is not spaces[1]
    assert spaces[0].match(tiny_sdxl.text_encoder) == 2
    assert spaces[1].match(tiny_sdxl.text_encoder_2) == 2
    # the second encoder's projection is the CLIP's text projection
    assert torch.equal(spaces[1].model.text_projection.weight, tiny_sdxl.text_encoder_2.text_projection.weight)


def test_injected_spaces_win(tiny_sd):
    other = cs.clip_around_text_encoder(tiny_sd.text_encoder, tiny_sd.tokenizer, seed=5, name="injected")
    tiny_sd.info["clip_spaces"] = [other]
    try:
        assert cs.clip_spaces_for(tiny_sd)[0] is other
    finally:
        tiny_sd.info.pop("clip_spaces")


def test_transformers_clip_loads_from_a_folder(tiny_sd, tmp_path):
    space = cs.clip_around_text_encoder(tiny_sd.text_encoder, tiny_sd.tokenizer, seed=7)
    space.model.save_pretrained(tmp_path / "clip")
    space.tokenizer.save_pretrained(tmp_path / "clip")
    loaded = cs.load_clip_space(str(tmp_path / "clip"))
    assert isinstance(loaded, cs.HFClipSpace)
    assert torch.allclose(loaded.text_features(["a cat"]), space.text_features(["a cat"]), atol=1e-5)
    img = _img(2)
    assert torch.allclose(loaded.image_features([img]), space.image_features([img]), atol=1e-6)
    # and it is accepted for the model whose text tower it carries
    assert cs.clip_spaces_for(tiny_sd, str(tmp_path / "clip"))[0].match(tiny_sd.text_encoder) == 2


def test_a_model_folder_that_carries_its_own_clip_uses_it(tiny_sd, tmp_path):
    from analogon.models import LoadOptions, load_bundle

    folder = tmp_path / "model"
    tiny_sd.pipe.save_pretrained(folder)
    own = cs.clip_around_text_encoder(tiny_sd.text_encoder, tiny_sd.tokenizer, seed=11)
    own.model.save_pretrained(folder / "clip")
    (folder / "feature_extractor").mkdir(exist_ok=True)
    (folder / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": {"height": 32, "width": 32}, "image_mean": [0.5, 0.5, 0.5],
         "image_std": [0.25, 0.25, 0.25]}))
    bundle = load_bundle(str(folder), LoadOptions(device="cpu"))
    space = cs.clip_spaces_for(bundle)[0]
    assert "(clip)" in space.name and space.mean == (0.5, 0.5, 0.5) and space.image_size == 32
    img = _img(4)
    assert torch.allclose(space.image_features([img]),
                          cs.HFClipSpace(own.model, own.tokenizer, "x", 32, (0.5,) * 3, (0.25,) * 3)
                          .image_features([img]), atol=1e-5)


# -- open_clip ---------------------------------------------------------------------------------

def test_open_clip_text_from_embeddings_matches_encode_text(open_tiny):
    texts = ["a red circle on grey", "x"]
    ref = open_tiny.model.encode_text(open_tiny.tokenize(texts))
    assert torch.equal(open_tiny.text_features(texts), ref.float())
    assert torch.allclose(open_tiny.features_with_tokens(texts[0], None), ref[:1], atol=1e-6)
    assert open_tiny.decode(open_tiny.tokenize(["a red circle"])[0].tolist()) == "a red circle"
    assert open_tiny.image_features([_img(5)]).shape == (1, open_tiny.dim)


def test_open_clip_loads_from_a_local_dir(open_tiny, tmp_path):
    from safetensors.torch import save_file

    import open_clip

    cfg = open_clip.get_model_config("analogon-tiny-clip")
    (tmp_path / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": cfg, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}))
    save_file({k: v.contiguous() for k, v in open_tiny.model.state_dict().items()},
              str(tmp_path / "open_clip_model.safetensors"))
    loaded = cs.load_clip_space(str(tmp_path))
    assert isinstance(loaded, cs.OpenClipSpace) and loaded.mean == (0.5, 0.5, 0.5)
    assert torch.equal(loaded.text_features(["a dog"]), open_tiny.text_features(["a dog"]))


def test_a_clip_that_cannot_read_the_text_encoder_is_refused(tiny_sd, open_tiny, tmp_path):
    # the tiny open_clip has CLIP's 49408-token vocabulary; tiny-sd a byte-level one
    assert open_tiny.match(tiny_sd.text_encoder) == 0
    tiny_sd.info["clip_spaces"] = [open_tiny]
    try:
        with pytest.raises(InputError) as e:
            cs.clip_spaces_for(tiny_sd)
        assert e.value.code == "clip_mismatch" and "text encoder" in e.value.message
    finally:
        tiny_sd.info.pop("clip_spaces")


def test_missing_real_clip_weights_are_a_readable_error():
    # HF_HUB_OFFLINE is set by the test suite: only the local cache is looked at.
    with pytest.raises(ModelError) as e:
        cs.load_clip_space("ViT-H-14", "laion2b_s32b_b79k")
    assert e.value.code == "clip_not_available" and "ViT-H-14" in e.value.message
    with pytest.raises(ModelError) as e:
        cs.load_clip_space("openai/clip-vit-large-patch14")
    assert e.value.code == "clip_not_available"
    with pytest.raises(InputError):
        cs.load_clip_space("/no/such/folder")
    with pytest.raises(InputError):
        cs.load_clip_space("ViT-H-14")  # no weights given
