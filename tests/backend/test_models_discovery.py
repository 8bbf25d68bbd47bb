"""Listing the checkpoints a painter already has: families from the safetensors header
alone, the usual folders, the Hugging Face cache, and /v1/models."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.numpy import save_file

from analogon.models import discovery
from analogon.models.discovery import CONV_IN, classify_file, scan

METHODS = ["pixels", "appearance", "dia", "difference"]
CLIP_L = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
OPEN_CLIP = "cond_stage_model.model.token_embedding.weight"
XL_L = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
XL_G = "conditioner.embedders.1.model.token_embedding.weight"
REFINER_G = "conditioner.embedders.0.model.token_embedding.weight"


def ckpt(path: Path, *text_keys: str, in_ch: int = 4, meta: dict | None = None, unet: bool = True) -> Path:
    """A small file with the tensor names (and the UNet input shape) of a real checkpoint."""
    tensors = {k: np.zeros((2, 2), np.float16) for k in text_keys}
    if unet:
        tensors[CONV_IN] = np.zeros((2, in_ch, 1, 1), np.float16)
        tensors["first_stage_model.decoder.conv_in.weight"] = np.zeros((2, 2), np.float16)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("keys,in_ch,meta,yaml,variant,family", [
    ((CLIP_L,), 4, None, None, "sd1", "sd1"),
    ((CLIP_L,), 9, None, None, "sd1-inpainting", "sd1"),
    ((OPEN_CLIP,), 4, None, None, "sd2", "sd2"),
    ((OPEN_CLIP,), 4, None, "model:\n  params:\n    parameterization: \"v\"\n", "sd2-v", "sd2"),
    ((OPEN_CLIP,), 4, None, "model:\n  params:\n    linear_start: 0.00085\n", "sd2-base", "sd2"),
    ((OPEN_CLIP,), 4, {"modelspec.architecture": "stable-diffusion-v2-512-base"}, None, "sd2-base", "sd2"),
    ((OPEN_CLIP,), 4, {"modelspec.prediction_type": "v"}, None, "sd2-v", "sd2"),
    ((OPEN_CLIP,), 9, None, None, "sd2-inpainting", "sd2"),
    ((XL_L, XL_G), 4, None, None, "sdxl", "sdxl"),
    ((REFINER_G,), 4, None, None, "sdxl-refiner", "sdxl"),
    ((XL_L, XL_G), 9, None, None, "sdxl-inpainting", "sdxl"),
])
def test_family_and_variant_from_the_header(tmp_path, keys, in_ch, meta, yaml, variant, family):
    path = ckpt(tmp_path / "m.safetensors", *keys, in_ch=in_ch, meta=meta)
    if yaml:
        path.with_suffix(".yaml").write_text(yaml)
    fam, var, note = classify_file(path)
    assert (fam, var) == (family, variant)
    assert ("decided at load" in note) == (variant == "sd2" and not meta and not yaml)
    assert "assumed" not in note


def test_only_the_header_is_read(tmp_path):
    """A header that promises 3 GiB of weights, then nothing but a hole: the scan lists the
    file with its family and size; loading it would fail, so nothing past the header was read."""
    path = ckpt(tmp_path / "big.safetensors", XL_L, XL_G)
    with open(path, "r+b") as f:
        f.truncate(3 * 2**30)
    [entry] = scan([tmp_path], METHODS, include_usual=False)
    assert (entry.family, entry.variant, entry.label) == ("sdxl", "sdxl", "SDXL")
    assert entry.size_bytes == 3 * 2**30 and entry.methods == METHODS


def test_the_embedded_tiny_checkpoint_written_as_one_file(tiny_sd, tmp_path):
    from analogon.models.single_file import save_single_file

    path = save_single_file(tiny_sd, tmp_path / "tiny.safetensors")
    assert classify_file(path)[:2] == ("sd1", "sd1")
    path2 = save_single_file(tiny_sd, tmp_path / "tiny2.safetensors", family="sd2")
    assert classify_file(path2)[:2] == ("sd2", "sd2")  # base or v: decided at load


def test_what_is_not_a_checkpoint_is_not_listed_and_unusable_ones_say_why(tmp_path):
    ckpt(tmp_path / "lora.safetensors", "lora_unet_down_blocks_0.alpha", unet=False)
    ckpt(tmp_path / "vae.safetensors", "decoder.conv_in.weight", unet=False)
    (tmp_path / "partial.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    (tmp_path / "notes.txt").write_text("x")
    ckpt(tmp_path / "sub" / "deeper" / "inpaint.safetensors", CLIP_L, in_ch=9)
    ckpt(tmp_path / "sub" / "refiner.safetensors", REFINER_G)
    ckpt(tmp_path / "A.safetensors", CLIP_L)
    found = {Path(c.id).name: c for c in scan([tmp_path], METHODS, include_usual=False)}
    assert set(found) == {"partial.safetensors", "inpaint.safetensors", "refiner.safetensors", "A.safetensors"}
    assert found["A.safetensors"].methods == METHODS
    assert found["inpaint.safetensors"].methods == [] and "inpainting" in found["inpaint.safetensors"].note
    # the refiner is PIXELS' only (the methods' own rule), and says so
    assert found["refiner.safetensors"].methods == ["pixels"] and "PIXELS only" in found["refiner.safetensors"].note
    assert found["partial.safetensors"].family is None and "cannot be read" in found["partial.safetensors"].note
    # usable first
    assert [c.name for c in scan([tmp_path], METHODS, include_usual=False)][0] == "A"


def _diffusers_folder(dest: Path, config: str, class_name: str | None = None) -> Path:
    from analogon.models.single_file import CONFIG_ROOT

    shutil.copytree(CONFIG_ROOT / config, dest)
    if class_name:
        index = json.loads((dest / "model_index.json").read_text())
        index["_class_name"] = class_name
        (dest / "model_index.json").write_text(json.dumps(index))
    return dest


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A user's home with the usual folders of other tools, and nothing of the real one."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("HOME", str(h))
    monkeypatch.setattr(sys, "platform", "linux")
    for var in ("XDG_DATA_HOME", "XDG_CACHE_HOME", "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
                "ANALOGON_DATA_DIR", "ANALOGON_MODELS_DIR", "ANALOGON_MODEL_DIRS"):
        monkeypatch.delenv(var, raising=False)
    return h


def test_the_usual_places_and_the_hub_cache(home, tmp_path):
    comfy = ckpt(home / "ComfyUI" / "models" / "checkpoints" / "dreamy.safetensors", CLIP_L)
    a1111 = ckpt(home / "stable-diffusion-webui" / "models" / "Stable-diffusion" / "xl.safetensors", XL_L, XL_G)
    kad = ckpt(home / ".local" / "share" / "krita" / "ai_diffusion" / "server" / "ComfyUI" / "models"
               / "checkpoints" / "kad.safetensors", OPEN_CLIP)
    ours = ckpt(home / ".local" / "share" / "analogon" / "models" / "mine.safetensors", CLIP_L)
    # the same file linked into A1111 too: listed once
    os.symlink(comfy, a1111.parent / "dreamy-link.safetensors")
    snap = home / ".cache" / "huggingface" / "hub" / "models--org--sd21" / "snapshots" / "abc"
    _diffusers_folder(snap, "sd21")
    (snap.parent.parent / "blobs").mkdir()
    (snap.parent.parent / "blobs" / "w").write_bytes(b"0" * 1000)
    single = home / ".cache" / "huggingface" / "hub" / "models--org--single" / "snapshots" / "def"
    ckpt(single / "v1.safetensors", CLIP_L)
    extra = ckpt(tmp_path / "mine" / "extra.safetensors", XL_L, XL_G)

    found = scan([tmp_path / "mine"], METHODS)
    by_name = {c.name: c for c in found}
    assert set(by_name) == {"dreamy", "xl", "kad", "mine", "extra", "org/sd21", "org/single/v1.safetensors"}
    assert by_name["dreamy"].location == "ComfyUI" and by_name["dreamy"].id == str(comfy)
    assert by_name["xl"].location == "Automatic1111 / Forge" and by_name["xl"].family == "sdxl"
    assert by_name["kad"].location == "Krita AI Diffusion" and by_name["kad"].variant == "sd2"  # decided at load
    assert by_name["mine"].location == "Analogon models" and by_name["mine"].id == str(ours)
    assert by_name["extra"].location == "configured" and by_name["extra"].id == str(extra)
    hub = by_name["org/sd21"]
    assert (hub.id, hub.source, hub.family, hub.location) == ("org/sd21", "hub", "sd2", "Hugging Face cache")
    assert hub.variant == "sd2-v" and hub.size_bytes == 1000
    assert by_name["org/single/v1.safetensors"].family == "sd1"
    assert discovery.recommended_for("difference", found).name in ("kad", "org/sd21")
    assert discovery.recommended_for("pixels", found).family == "sdxl"
    assert discovery.recommended_for("appearance", found).family == "sd1"


def test_a_diffusers_folder_inside_a_models_folder(tmp_path):
    _diffusers_folder(tmp_path / "models" / "my-sdxl", "sdxl_base")
    [entry] = scan([tmp_path / "models"], METHODS, include_usual=False)
    assert (entry.name, entry.family, entry.variant, entry.source) == ("my-sdxl", "sdxl", "sdxl", "folder")


def test_a_checkpoints_own_config_folder_is_not_listed_as_a_model(tmp_path):
    ckpt(tmp_path / "m.safetensors", CLIP_L)
    _diffusers_folder(tmp_path / "m.config", "sd15")  # weights-less, beside its checkpoint
    _diffusers_folder(tmp_path / "lone.config", "sd15")  # no checkpoint beside: a folder model
    assert sorted(c.name for c in scan([tmp_path], METHODS, include_usual=False)) == ["lone.config", "m"]


@pytest.mark.parametrize("platform,env,expect", [
    ("win32", {"APPDATA": "C:/Users/p/AppData/Roaming", "LOCALAPPDATA": "C:/Users/p/AppData/Local"},
     ("C:/Users/p/AppData/Roaming/krita", "C:/Users/p/AppData/Local/analogon")),
    ("darwin", {}, ("{home}/Library/Application Support/krita", "{home}/Library/Application Support/analogon")),
    ("linux", {"XDG_DATA_HOME": "/x/data"}, ("/x/data/krita", "/x/data/analogon")),
    ("linux", {}, ("{home}/.local/share/krita", "{home}/.local/share/analogon")),
])
def test_folders_per_platform(home, monkeypatch, platform, env, expect):
    monkeypatch.setattr(sys, "platform", platform)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    krita, data = (Path(e.format(home=home)) for e in expect)
    assert discovery.krita_data_dir() == krita and discovery.data_dir() == data
    assert ("Krita AI Diffusion", krita / "ai_diffusion" / "server" / "ComfyUI" / "models" / "checkpoints") \
        in discovery.usual_places()


def test_v1_models_lists_them_for_the_docker(tmp_path):
    from analogon.server import ServerThread, Settings

    ckpt(tmp_path / "comfy" / "sd15.safetensors", CLIP_L)
    ckpt(tmp_path / "comfy" / "inpaint.safetensors", CLIP_L, in_ch=9)
    settings = Settings(port=0, state_dir=tmp_path / "state", cache_dir="", device="cpu",
                        model_dirs=[tmp_path / "comfy"], scan_usual_places=False)
    with ServerThread(settings) as srv:
        body = httpx.get(srv.url + "/v1/models", headers={"Authorization": f"Bearer {srv.token}"}).json()
    models = {m["id"]: m for m in body["models"]}
    sd15 = models[str(tmp_path / "comfy" / "sd15.safetensors")]
    assert sd15["family"] == "sd1" and sd15["label"] == "SD 1.x" and sd15["size_bytes"] > 0
    assert sd15["location"] == "configured" and set(sd15["methods"]) >= {"pixels", "dia", "appearance"}
    assert models[str(tmp_path / "comfy" / "inpaint.safetensors")]["methods"] == []
    assert models["tiny-sd"]["developer"] and models["tiny-sdxl"]["developer"]
    assert models["toy-sd"]["label"] == "demo (toy world)" and not models["toy-sd"]["developer"]
    assert body["recommended"]["dia"] == sd15["id"]
    assert body["searched"] == [str(tmp_path / "comfy")]
