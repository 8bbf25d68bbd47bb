"""Listing the checkpoints a painter already has: families from the safetensors header
alone, the usual folders, the Hugging Face cache, and /v1/models."""
from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
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
    # the 64-px model is there for speed, under a name that says so, never offered first
    assert models["toy-sd-64"]["developer"] and "64-px" in models["toy-sd-64"]["label"]
    assert body["recommended"]["dia"] == sd15["id"]
    assert body["searched"] == [str(tmp_path / "comfy")]


# -- a hostile file system (issue 28) ------------------------------------------------------------
#
# Each builder makes one kind of odd thing named after ``stem`` in ``folder`` and returns the
# path the scan reports it under. The discovery fuzz in test_contract_fuzz.py builds random
# trees of them.

def raw_safetensors(path: Path, header: str | bytes, claimed: int | None = None, data: bytes = b"") -> Path:
    """A file with a safetensors length prefix (``claimed``, else the header's length)."""
    body = header.encode("utf-8") if isinstance(header, str) else header
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((len(body) if claimed is None else claimed).to_bytes(8, "little") + body + data)
    return path


def conv_in_shaped(shape_json: str) -> str:
    """An SD 1.x header whose UNet input shape is ``shape_json`` (written as given)."""
    return ('{"%s": {"dtype": "F16", "shape": %s, "data_offsets": [0, 0]}, '
            '"%s": {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 8]}}' % (CONV_IN, shape_json, CLIP_L))


def _header(text: str | bytes, claimed: int | None = None):
    return lambda folder, stem: raw_safetensors(folder / f"{stem}.safetensors", text, claimed)


def _symlink(target: str | Path, link: Path) -> Path:
    os.symlink(target, link)
    return link


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _diffusers_index(folder: Path, index: str, unet: str = '{"in_channels": 4}') -> Path:
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(index)
    (folder / "unet" / "config.json").write_text(unet)
    return folder


def _link_loop(folder: Path, stem: str) -> Path:
    _symlink(folder / f"{stem}.safetensors", folder / f"{stem}-b.safetensors")
    return _symlink(folder / f"{stem}-b.safetensors", folder / f"{stem}.safetensors")


def _folder_loop(folder: Path, stem: str) -> Path:
    (folder / stem).mkdir()
    return _symlink(folder / stem, folder / stem / "again")


def _sd2_with_fifo_yaml(folder: Path, stem: str) -> Path:
    _fifo(folder / f"{stem}.yaml")
    return ckpt(folder / f"{stem}.safetensors", OPEN_CLIP)


def _fifo_model_index(folder: Path, stem: str) -> Path:
    (folder / stem / "unet").mkdir(parents=True)
    _fifo(folder / stem / "model_index.json")
    return folder / stem


def _fifo_unet_config(folder: Path, stem: str) -> Path:
    (folder / stem / "unet").mkdir(parents=True)
    (folder / stem / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    _fifo(folder / stem / "unet" / "config.json")
    return folder / stem


def _sparse_header(folder: Path, stem: str) -> Path:
    """A header that claims 20 MiB (under the old limit of 100 MiB) in a file that has them."""
    path = raw_safetensors(folder / f"{stem}.safetensors", b"{", claimed=20 * 2**20)
    with open(path, "r+b") as f:
        f.truncate(8 + 20 * 2**20)
    return path


def _hf_dangling_snapshot(cache: Path, stem: str) -> Path:
    snaps = cache / f"models--org--{stem}" / "snapshots"
    snaps.mkdir(parents=True)
    return _symlink(cache / "not-there" / "abc", snaps / "abc")


def _folder_named_like_a_checkpoint(folder: Path, stem: str) -> Path:
    (folder / f"{stem}.safetensors").mkdir()
    return folder / f"{stem}.safetensors"


# kind -> (builder, where the scan reports it: "skipped", "entry" or None (not at all), words of the reason)
ODD_THINGS: dict[str, tuple] = {
    "dangling link": (lambda d, s: _symlink(d / "unmounted" / "x.safetensors", d / f"{s}.safetensors"),
                      "skipped", "missing"),
    "link loop": (_link_loop, "skipped", "link loop"),
    "folder link loop": (_folder_loop, "skipped", "link loop"),
    "header nested 100,000 deep": (_header("[" * 100_000 + "]" * 100_000), "entry", "nested too deeply"),
    "shape [320,null,3,3]": (_header(conv_in_shaped("[320, null, 3, 3]")), "entry", "shape"),
    "shape [320,[9],3,3]": (_header(conv_in_shaped("[320, [9], 3, 3]")), "entry", "shape"),
    "shape [320,1e999,3,3]": (_header(conv_in_shaped("[320, 1e999, 3, 3]")), "entry", "1e999"),
    "shape an object": (_header(conv_in_shaped('{"a": 1, "b": 2}')), "entry", "shape"),
    "model_index.json a list": (lambda d, s: _diffusers_index(d / s, "[1, 2]"), "entry", "a list, not a JSON object"),
    "FIFO named *.safetensors": (lambda d, s: _fifo(d / f"{s}.safetensors"), "skipped", "a FIFO"),
    "FIFO model_index.json": (_fifo_model_index, "entry", "a FIFO"),
    "FIFO unet/config.json": (_fifo_unet_config, "entry", "a FIFO"),
    "FIFO yaml beside an SD 2.x file": (_sd2_with_fifo_yaml, "entry", "decided at load"),
    "link to a device": (lambda d, s: _symlink("/dev/zero", d / f"{s}.safetensors"), "skipped", "a device"),
    "header of 20 MiB": (_sparse_header, "entry", "are not read"),
    "header length 2^63": (_header("{}", claimed=2**63), "entry", "not plausible"),
    "header not UTF-8": (_header(b'{"\xff\xfe": 1}'), "entry", "not valid JSON"),
    "empty file": (_header(b"", claimed=0), "entry", "not plausible"),
    "metadata not text": (_header('{"__metadata__": {"a": [1]}}'), "entry", "metadata"),
    "header a list": (_header("[1]"), "entry", "not a JSON object"),
    "folder named *.safetensors": (_folder_named_like_a_checkpoint, None, None),
    "class name not text": (lambda d, s: _diffusers_index(d / s, '{"_class_name": 5}'), "entry", "pipeline class"),
    "in_channels not a number": (lambda d, s: _diffusers_index(d / s, '{"_class_name": "StableDiffusionPipeline"}',
                                                               '{"in_channels": "nine"}'), "entry", "nine"),
    "cut short": (_header(conv_in_shaped("[2, 4, 1, 1]")), "entry", "shorter than its header says"),
}
HF_ODD_THINGS = {"HF snapshot a dangling link": (_hf_dangling_snapshot, "skipped", "missing")}

posix_only = pytest.mark.skipif(os.name != "posix", reason="FIFOs, devices and symlinks as POSIX has them")


def _outcome(result, path: Path) -> tuple[str, str] | None:
    """("entry" | "skipped", note or reason) for what the scan made of ``path``."""
    for c in result.checkpoints:
        if c.id == str(path):
            return "entry", c.note
    for s in result.skipped:
        if s.path == str(path) or s.path.startswith(str(path) + os.sep):
            return "skipped", s.reason
    return None


def in_thread(timeout: float, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a thread, or None when it has not returned after ``timeout``
    seconds (a test of something that used to hang fails instead of hanging)."""
    out = []
    t = threading.Thread(target=lambda: out.append(fn(*args, **kwargs)), daemon=True)
    t.start()
    t.join(timeout)
    return out[0] if out else None


def unblock_fifos(root: Path) -> None:
    """Open every FIFO under ``root`` for writing and close it: a reader blocked on one ends."""
    for p in root.rglob("*"):
        try:
            fd = os.open(p, os.O_WRONLY | os.O_NONBLOCK) if p.is_fifo() else None
        except OSError:
            continue
        if fd is not None:
            os.close(fd)


@posix_only
def test_every_odd_thing_is_skipped_or_unreadable_with_its_reason(tmp_path):
    """Item 1 and 2: each of them made every scan fail (a 500) or hang; now each is one entry
    "cannot be read (reason)" or one skipped path with its reason, and the good model is listed."""
    models, hf = tmp_path / "models", tmp_path / "hf"
    models.mkdir(), hf.mkdir()
    ckpt(models / "good.safetensors", CLIP_L)
    paths = {kind: build(hf if kind in HF_ODD_THINGS else models, f"odd{i:02d}")
             for i, (kind, (build, _, _)) in enumerate({**ODD_THINGS, **HF_ODD_THINGS}.items())}
    try:
        result = in_thread(30, discovery.run_scan, [models], METHODS, include_usual=False, hf_cache=hf)
        assert result is not None, "the scan hung"
    finally:
        unblock_fifos(tmp_path)
    sd2 = paths["FIFO yaml beside an SD 2.x file"].stem  # a model all the same: its yaml is not read
    assert [c.name for c in result.checkpoints if c.methods] == ["good", sd2]
    for kind, (_, where, words) in {**ODD_THINGS, **HF_ODD_THINGS}.items():
        got = _outcome(result, paths[kind])
        if where is None:
            assert got is None, (kind, got)
            continue
        assert got is not None and got[0] == where and words in got[1], (kind, got)
        if where == "entry" and "decided at load" not in got[1]:
            assert got[1].startswith("cannot be read ("), (kind, got)
    assert result.complete and result.skipped_total == len(result.skipped)


@posix_only
def test_a_fifo_never_blocks_classify_file(tmp_path):
    os.mkfifo(tmp_path / "f.safetensors")
    try:
        assert in_thread(10, classify_file, tmp_path / "f.safetensors") == (
            None, None, "cannot be read (a FIFO, not a file)")
    finally:
        unblock_fifos(tmp_path)


def test_a_header_over_the_limit_is_not_parsed(tmp_path, monkeypatch):
    """Item 3: a 90 MiB header took 70 s and 1 GB; one over MAX_HEADER_BYTES is refused before
    a byte of it is read."""
    from analogon.models import checkpoint_header

    header = json.dumps({CONV_IN: {"dtype": "F16", "shape": [2, 4, 1, 1], "data_offsets": [0, 0]},
                         CLIP_L: {"dtype": "F16", "shape": [1], "data_offsets": [0, 0]},
                         "__metadata__": {"pad": "x" * (checkpoint_header.MAX_HEADER_BYTES + 10)}})
    path = raw_safetensors(tmp_path / "big.safetensors", header)
    parsed = []
    monkeypatch.setattr(checkpoint_header, "parse_json", lambda *a, **k: parsed.append(1))
    fam, var, note = classify_file(path)
    limit = checkpoint_header.MAX_HEADER_BYTES // 2**20
    assert (fam, var) == (None, None) and f"headers over {limit} MiB are not read" in note and not parsed


def test_the_scan_keeps_to_its_budget_and_says_so(tmp_path, monkeypatch):
    """Item 3: a scan of many files ends when its budget does, with what it found and a note."""
    from analogon.models.discovery import Budget, run_scan

    for i in range(30):
        ckpt(tmp_path / "a" / f"m{i:02d}.safetensors", CLIP_L)
    for i in range(150):
        (tmp_path / "b" / f"{i}.safetensors").parent.mkdir(exist_ok=True)
        (tmp_path / "b" / f"{i}.safetensors").write_bytes(b"")
    full = run_scan([tmp_path], METHODS, include_usual=False)
    assert full.complete and len(full.checkpoints) == 180 and full.notes == []
    # entries: at most 10 models and 5 unreadable files listed, the rest counted
    capped = run_scan([tmp_path], METHODS, include_usual=False, budget=Budget(listed=10, unreadable=5))
    assert len([c for c in capped.checkpoints if c.methods]) == 10 and len(capped.checkpoints) == 15
    assert any("20 more checkpoints" in n for n in capped.notes)
    assert any("145 more files that cannot be read" in n for n in capped.notes)
    # files and folders looked at
    short = run_scan([tmp_path], METHODS, include_usual=False, budget=Budget(entries=20))
    assert not short.complete and len(short.checkpoints) < 20 and any("files and folders" in n for n in short.notes)
    # time: each header read takes 0.05 s here; a budget of 0.3 s ends the scan early
    real = discovery.read_safetensors_header
    monkeypatch.setattr(discovery, "_CACHE", discovery.ResultCache())

    def slow_read(path):
        time.sleep(0.05)
        return real(path)

    monkeypatch.setattr(discovery, "read_safetensors_header", slow_read)
    t0 = time.monotonic()
    timed = run_scan([tmp_path / "a"], METHODS, include_usual=False, budget=Budget(seconds=0.3))
    assert time.monotonic() - t0 < 1.5
    assert not timed.complete and 0 < len(timed.checkpoints) < 30
    assert any("time budget" in n for n in timed.notes)


def test_the_result_cache_is_bounded(tmp_path, monkeypatch):
    """Item 3: the per-file cache only grew; it keeps the most recently used results."""
    monkeypatch.setattr(discovery, "_CACHE", discovery.ResultCache(8))
    for i in range(20):
        ckpt(tmp_path / f"m{i:02d}.safetensors", CLIP_L)
    assert len(scan([tmp_path], METHODS, include_usual=False)) == 20
    assert len(discovery._CACHE) == 8
    classify_file(tmp_path / "m19.safetensors")  # a hit: no parse
    reads = []
    monkeypatch.setattr(discovery, "read_safetensors_header", lambda p: reads.append(p))
    assert classify_file(tmp_path / "m19.safetensors")[1] == "sd1" and reads == []


def _serve_models(tmp_path, folder: Path, **kw):
    from analogon.server import ServerThread, Settings

    return ServerThread(Settings(port=0, state_dir=tmp_path / "state", cache_dir="", device="cpu",
                                 model_dirs=[folder], scan_usual_places=False, **kw))


def _timed_get(url: str, **kw) -> tuple[float, httpx.Response]:
    t0 = time.monotonic()
    r = httpx.get(url, timeout=30, **kw)
    return time.monotonic() - t0, r


@posix_only
def test_v1_models_answers_200_for_every_odd_thing_in_parallel(tmp_path):
    """Items 1 and 2 through the server: every odd thing in one models folder; 45 requests at
    once all answer 200 with the good model, and health stays fast."""
    from concurrent.futures import ThreadPoolExecutor

    models = tmp_path / "models"
    models.mkdir()
    ckpt(models / "good.safetensors", CLIP_L)
    for i, (build, _, _) in enumerate(ODD_THINGS.values()):
        build(models, f"odd{i:02d}")
    try:
        with _serve_models(tmp_path, models) as srv:
            auth = {"Authorization": f"Bearer {srv.token}"}
            with ThreadPoolExecutor(45) as pool:
                answers = list(pool.map(lambda _: _timed_get(srv.url + "/v1/models?wait=10", headers=auth),
                                        range(45)))
            health = [_timed_get(srv.url + "/v1/health")[0] for _ in range(5)]
    finally:
        unblock_fifos(tmp_path)
    for _, r in answers:
        assert r.status_code == 200, r.text
        body = r.json()
        assert str(models / "good.safetensors") in {m["id"] for m in body["models"]}
        assert body["scan"]["complete"] and body["scan"]["skipped_total"] >= 5
        assert {s["reason"] for s in body["scan"]["skipped"]} >= {"a FIFO, not a file", "a device, not a file"}
    assert max(health) < 1.0, health


def test_v1_models_reads_the_last_scan_and_never_waits_for_one(tmp_path, monkeypatch):
    """Item 3: the scan ran on the request's time (155 s for 100,000 files); now it runs in the
    background: at start, when a folder changes and on ?refresh, and a request answers at once."""
    folder = tmp_path / "comfy"
    for i in range(20):
        ckpt(folder / f"m{i:02d}.safetensors", CLIP_L)
    real = discovery.read_safetensors_header

    def slow_read(path):  # a slow disk: the scan of 20 files takes 4 s
        time.sleep(0.2)
        return real(path)

    monkeypatch.setattr(discovery, "_CACHE", discovery.ResultCache())
    monkeypatch.setattr(discovery, "read_safetensors_header", slow_read)
    with _serve_models(tmp_path, folder) as srv:
        auth = {"Authorization": f"Bearer {srv.token}"}
        took, r = _timed_get(srv.url + "/v1/models?wait=0", headers=auth)
        assert r.status_code == 200 and took < 1.0, took
        assert r.json()["scan"]["running_since"] is not None
        assert not any(m["source"] == "file" for m in r.json()["models"])  # nothing scanned yet
        health = [_timed_get(srv.url + "/v1/health")[0] for _ in range(5)]
        assert max(health) < 1.0, health
        listed = httpx.get(srv.url + "/v1/models?wait=10", headers=auth, timeout=30).json()
        assert len([m for m in listed["models"] if m["source"] == "file"]) == 20
        assert listed["scan"]["complete"] and listed["scan"]["running_since"] is None
        monkeypatch.setattr(discovery, "read_safetensors_header", real)
        # a new file: the folder changed, and the scanner notices by itself
        ckpt(folder / "new.safetensors", XL_L, XL_G)
        deadline = time.monotonic() + 15
        while str(folder / "new.safetensors") not in {
                m["id"] for m in httpx.get(srv.url + "/v1/models", headers=auth, timeout=30).json()["models"]}:
            assert time.monotonic() < deadline, "the change was not noticed"
            time.sleep(0.2)
        # and one asked for: ?refresh=true starts a scan, ?wait waits for it
        os.remove(folder / "new.safetensors")
        ids = {m["id"] for m in httpx.get(srv.url + "/v1/models?refresh=true&wait=10", headers=auth,
                                          timeout=30).json()["models"]}
        assert str(folder / "new.safetensors") not in ids and str(folder / "m00.safetensors") in ids
        for bad in ("wait=-1", "wait=11", "wait=nan", "refresh=maybe"):
            r = httpx.get(srv.url + "/v1/models?" + bad, headers=auth, timeout=30)
            assert r.status_code == 422 and r.json()["code"] == "invalid_params", bad


def test_the_scan_and_the_loader_do_not_import_each_other():
    """Both read checkpoint headers through models.checkpoint_header; neither imports the other."""
    import ast

    import analogon.models.single_file as single_file

    def imported(module) -> set[str]:
        tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
        return {f"{'.' * n.level}{n.module or ''}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}

    assert ".single_file" not in imported(discovery) and ".discovery" not in imported(single_file)
    assert ".checkpoint_header" in imported(discovery) & imported(single_file)
