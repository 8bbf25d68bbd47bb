"""Captions: user captions win, the captioner fills only the gaps (cached), BLIP loads from a
local folder (a tiny one built offline), PEZ finds hard prompts in a tiny open_clip."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from analogon.core import captioning as cap
from analogon.core import clip_space as cs
from analogon.errors import InputError, ModelError


def _img(seed, h=32, w=40):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 4), dtype=np.uint8)


class Recorder:
    id = "recorder"

    def __init__(self):
        self.calls = []

    def caption(self, images):
        self.calls.append(len(images))
        return [f"caption {len(self.calls)}" for _ in images]


def _images():
    return {"a": (_img(0), "sha-a"), "a_prime": (_img(1), "sha-ap"), "b": (_img(2), "sha-b")}


def test_user_captions_win_and_no_captioner_is_made():
    def make():
        raise AssertionError("the captioner must not be loaded when every caption is typed")

    caps, src = cap.resolve_captions({"a": "a cat", "a_prime": "a cat in a hat", "b": " a dog "},
                                     _images(), "blip", make)
    assert caps == {"a": "a cat", "a_prime": "a cat in a hat", "b": "a dog"}
    assert set(src.values()) == {"user"}


def test_captioner_fills_only_the_gaps_and_is_cached(cache):
    rec = Recorder()
    caps, src = cap.resolve_captions({"a": "a cat", "a_prime": "", "b": "  "}, _images(), "blip",
                                     lambda: rec, cache, {"model": "m"})
    assert caps["a"] == "a cat" and src["a"] == "user"
    assert caps["a_prime"] == "caption 1" and caps["b"] == "caption 2"
    assert src["a_prime"] == src["b"] == "recorder" and rec.calls == [1, 1]
    caps2, src2 = cap.resolve_captions({"a": "a cat"}, _images(), "blip", lambda: rec, cache,
                                       {"model": "m"})
    assert caps2 == caps and src2["b"] == "cache" and rec.calls == [1, 1]
    # other settings (another captioning model) are another cache entry
    cap.resolve_captions({"a": "a cat"}, _images(), "blip", lambda: rec, cache, {"model": "other"})
    assert rec.calls == [1, 1, 1, 1]


def test_user_only_names_the_missing_captions():
    with pytest.raises(InputError) as e:
        cap.resolve_captions({"a": "x"}, _images(), "user_only", Recorder,
                             titles={"a_prime": "A′ (after)", "b": "B (target)"})
    assert e.value.code == "captions_missing"
    assert "A′ (after)" in e.value.message and "B (target)" in e.value.message
    assert e.value.detail["missing"] == ["a_prime", "b"]


# -- BLIP ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_blip_folder(tmp_path_factory):
    from transformers import (
        BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
        BlipProcessor,
    )

    d = tmp_path_factory.mktemp("blip")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "blue", "square"]
    (d / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = BertTokenizerFast(vocab_file=str(d / "vocab.txt"))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    proc = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                         tokenizer=tok)
    cfg = BlipConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, encoder_hidden_size=32,
                         bos_token_id=tok.bos_token_id, pad_token_id=0, sep_token_id=3,
                         eos_token_id=3),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2),
        projection_dim=16)
    torch.manual_seed(0)
    out = d / "model"
    BlipForConditionalGeneration(cfg).save_pretrained(out)
    proc.save_pretrained(out)
    return out


def test_blip_captioner_loads_a_local_folder_and_captions(tiny_blip_folder):
    c = cap.BlipCaptioner(str(tiny_blip_folder), "cpu", torch.float32, max_new_tokens=5)
    out = c.caption([_img(0), _img(1, 50, 20)])
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    assert c.id.startswith("blip:")


def test_missing_captioning_model_is_a_readable_error(tmp_path):
    with pytest.raises(ModelError) as e:
        cap.BlipCaptioner("Salesforce/blip2-opt-2.7b")  # not in the cache; offline in tests
    assert e.value.code == "captioner_not_available" and "Type the three captions" in e.value.message
    with pytest.raises(InputError):
        cap.BlipCaptioner(str(tmp_path / "nothing-here"))


# -- PEZ --------------------------------------------------------------------------------------------

def test_pez_finds_a_hard_prompt_of_real_tokens():
    space = cs.tiny_open_clip(seed=3)
    settings = cap.PezSettings(n_tokens=4, steps=25, lr=0.1, weight_decay=0.1, seed=1)
    steps = []
    res = cap.pez_prompt(space, [_img(7)], settings, on_step=lambda i, n: steps.append((i, n)))
    assert steps[-1] == (25, 25) and len(res.history) == 25
    assert len(res.ids) == 4 and not {space.bos_id, space.eot_id, space.pad_id} & set(res.ids)
    assert all(space.tokenizer.decoder[i].endswith("</w>") for i in res.ids)  # whole words
    assert res.similarity == max(res.history)
    assert isinstance(res.text, str) and res.text
    # the reported similarity is that of the returned hard prompt
    target = torch.nn.functional.normalize(space.image_features([_img(7)]), dim=-1)
    emb = space.token_embedding().weight[torch.tensor(res.ids)]
    feat = torch.nn.functional.normalize(space.features_with_tokens("", emb), dim=-1)
    assert float(feat @ target.T) == pytest.approx(res.similarity, abs=1e-5)
    # the optimisation finds a better prompt than the random one it starts from
    assert res.similarity > res.history[0]
