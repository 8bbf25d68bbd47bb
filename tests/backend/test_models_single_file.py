"""Model resolver: tiny models saved as a diffusers folder and as an LDM single file,
reloaded offline, give the same UNet output; shipped configs match the real families;
missing or broken models give readable errors. Nothing here may use the network."""
from __future__ import annotations

import socket

import pytest
import torch

from analogon.errors import ModelError
from analogon.models import LoadOptions, family_from_state_dict_keys, load_bundle, variant_from_state_dict_keys
from analogon.models.single_file import (
    CONFIG_ROOT, checkpoint_keys, clip_to_ldm, open_clip_to_ldm, save_single_file, unet_to_ldm,
    vae_to_ldm,
)

CPU = LoadOptions(device="cpu")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    real = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if host not in ("127.0.0.1", "::1", "localhost") and not str(host).startswith("/"):
            raise AssertionError(f"test tried the network: {address}")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


def unet_out(bundle) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    unet = bundle.unet
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    kw = {}
    if bundle.is_sdxl:
        pooled = bundle.text_encoder_2.config.projection_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=g),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        return unet(x, torch.tensor([500]), encoder_hidden_states=ctx, **kw).sample


def text_out(bundle, which="text_encoder") -> torch.Tensor:
    te = getattr(bundle, which)
    ids = bundle.tokenizer("a red cube", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return te(ids).last_hidden_state


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Same weights, same inputs: equal up to kernel choice (weights loaded from disk may be laid
    out differently in memory, which changes float summation order by ~1e-7)."""
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("name,family", [("tiny-sd", "sd1"), ("tiny-sdxl", "sdxl")])
def test_tiny_model_round_trips_folder_and_single_file(name, family, tmp_path, request):
    orig = request.getfixturevalue(name.replace("-", "_"))
    ref = unet_out(orig)
    # a local diffusers folder
    folder = tmp_path / "folder"
    orig.pipe.save_pretrained(folder)
    b = load_bundle(str(folder), CPU)
    assert (b.family, b.source) == (family, "local")
    same_weights(orig.unet, b.unet)
    close(unet_out(b), ref)
    # a single LDM-layout file with its config folder beside it
    path = save_single_file(orig, tmp_path / f"{name}.safetensors")
    keys = checkpoint_keys(path)
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.encoder.down.") for k in keys)
    assert family_from_state_dict_keys(keys) == family
    b = load_bundle(str(path), CPU)
    assert (b.family, b.source) == (family, "single_file") and b.key.startswith("file:")
    close(unet_out(b), ref)
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(orig, comp) is not None:
            same_weights(getattr(orig, comp), getattr(b, comp))
    close(text_out(b), text_out(orig))
    assert b.tokenizer("a red cube").input_ids == orig.tokenizer("a red cube").input_ids


def test_open_clip_layout_loads_as_sd2(tiny_sd, tmp_path):
    path = save_single_file(tiny_sd, tmp_path / "sd2-shaped.safetensors", family="sd2")
    keys = checkpoint_keys(path)
    assert "cond_stage_model.model.token_embedding.weight" in keys
    assert any(k.endswith("attn.in_proj_weight") for k in keys)
    b = load_bundle(str(path), CPU)
    assert b.family == "sd2"
    same_weights(b.text_encoder, tiny_sd.text_encoder)
    close(text_out(b), text_out(tiny_sd))
    close(unet_out(b), unet_out(tiny_sd))


def _meta_pipeline_keys(config: str):
    """LDM keys (with shapes) of a full-size model built from a shipped config, on the meta device."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    root = CONFIG_ROOT / config
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(root / "unet")))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(root / "vae")))
        te = (CLIPTextModel(CLIPTextConfig.from_pretrained(str(root / "text_encoder")))
              if (root / "text_encoder").exists() else None)
        te2 = (CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(str(root / "text_encoder_2")))
               if (root / "text_encoder_2").exists() else None)
    up_attn = [t.startswith("CrossAttn") for t in unet.config.up_block_types]
    sd = unet_to_ldm(unet.state_dict(), unet.config.layers_per_block, up_attn)
    sd.update(vae_to_ldm(vae.state_dict(), len(vae.config.up_block_types)))
    counts = {"unet": sum(p.numel() for p in unet.parameters())}
    if te is not None:
        counts["text"] = sum(p.numel() for p in te.parameters())
    if config == "sdxl_refiner":  # OpenCLIP bigG is its only (first) embedder
        sd.update(open_clip_to_ldm(te2.state_dict(), "conditioner.embedders.0.model."))
        counts["text2"] = sum(p.numel() for p in te2.parameters())
    elif config == "sd15":
        sd.update(clip_to_ldm(te.state_dict(), "cond_stage_model.transformer."))
    elif config == "sd21":
        sd.update(open_clip_to_ldm(te.state_dict(), "cond_stage_model.model."))
    else:
        sd.update(clip_to_ldm(te.state_dict(), "conditioner.embedders.0.transformer."))
        sd.update(open_clip_to_ldm(te2.state_dict(), "conditioner.embedders.1.model."))
        counts["text2"] = sum(p.numel() for p in te2.parameters())
    return sd, counts


@pytest.mark.parametrize("config,family,kind,unet_params", [
    ("sd15", "sd1", "v1", 859_520_964), ("sd21", "sd2", "v2", 865_910_724),
    ("sdxl_base", "sdxl", "xl_base", 2_567_463_684),
    # the refiner: 384 base channels, [1, 2, 4, 4], transformer depth 4, cross-attention 1280,
    # 5 time ids (2560 = 5·256 + 1280); the same config diffusers derives from the SGM yaml
    ("sdxl_refiner", "sdxl", "xl_refiner", 2_259_526_660),
])
def test_shipped_configs_match_the_real_families(config, family, kind, unet_params):
    """The config folders build models of the published sizes, and their LDM layout is what
    diffusers recognises as that family (so real checkpoints map onto them key for key)."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    sd, counts = _meta_pipeline_keys(config)
    assert counts["unet"] == unet_params
    assert family_from_state_dict_keys(list(sd)) == family
    assert variant_from_state_dict_keys(list(sd)) == ("sdxl-refiner" if kind == "xl_refiner" else family)
    assert infer_diffusers_model_type(sd) == kind


def test_single_file_without_matching_config_is_a_readable_error(tiny_sd, tmp_path):
    # tiny weights, no config folder beside them: the shipped SD 1.5 shapes do not fit
    path = save_single_file(tiny_sd, tmp_path / "odd.safetensors", with_config=False)
    with pytest.raises(ModelError) as e:
        load_bundle(str(path), CPU)
    assert e.value.code == "bad_checkpoint" and "odd.safetensors" in e.value.message


def test_missing_and_broken_models_give_clear_messages(tmp_path):
    cases = {
        str(tmp_path / "nowhere.safetensors"): "model_not_found",
        "no-such-model": "model_not_found",
        "someone/not-in-the-cache": "model_not_available",
    }
    for spec, code in cases.items():
        with pytest.raises(ModelError) as e:
            load_bundle(spec, CPU)
        assert e.value.code == code, spec
        msg = e.value.message
        assert "local" in msg and ".safetensors" in msg, msg  # says how to point at a local model
    (tmp_path / "half.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(ModelError) as e:
        load_bundle(str(tmp_path / "half.safetensors"), CPU)
    assert e.value.code == "bad_checkpoint" and "half.safetensors" in e.value.message
    from safetensors.torch import save_file

    save_file({"some.weight": torch.zeros(2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ModelError) as e:
        load_bundle(str(tmp_path / "lora.safetensors"), CPU)
    assert e.value.code == "unknown_checkpoint"
    (tmp_path / "empty").mkdir()  # a folder that is not a model: not found, as if it were not there
    with pytest.raises(ModelError) as e:
        load_bundle(str(tmp_path / "empty"), CPU)
    assert e.value.code == "model_not_found"


def test_clip_tokenizer_matches_open_clip():
    """The offline CLIP tokenizer (for single files) gives CLIP's own ids."""
    import open_clip

    from analogon.models.tokenizer import openai_clip_tokenizer

    tok, ref = openai_clip_tokenizer(), open_clip.get_tokenizer("ViT-L-14")
    for text in ("a photo of a cat", "A Photograph, of   dogs!", "naïve café — 東京 🙂 x2.5"):
        assert tok(text).input_ids == [i for i in ref([text])[0].tolist() if i]
    assert openai_clip_tokenizer(pad_token="!").pad_token_id == 0
