"""The docker's model list (from a real backend's /v1/models), the choice per method, and the
memory preset and model folders reaching the command line of the backend it starts."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from analogon_krita.controller import Controller
from analogon_krita.link import backend_options
from analogon_krita.ui import models_ui
from conftest import wait_until

import schemas


def _ckpt(path: Path, *keys: str, in_ch: int = 4) -> Path:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    t = {k: np.zeros((2, 2), np.float16) for k in keys}
    t["model.diffusion_model.input_blocks.0.0.weight"] = np.zeros((2, in_ch, 1, 1), np.float16)
    save_file(t, str(path))
    return path


def _listing(tmp_path_factory, memory_bytes: int) -> dict:
    """/v1/models of a real server that found an SD 1.5, an SDXL and an inpainting checkpoint,
    on a machine with ``memory_bytes`` free."""
    import httpx

    from analogon.server import ServerThread, Settings

    d = tmp_path_factory.mktemp("comfy")
    _ckpt(d / "dreamy.safetensors", "cond_stage_model.transformer.text_model.x")
    _ckpt(d / "juggernaut.safetensors", "conditioner.embedders.0.transformer.x", "conditioner.embedders.1.model.x")
    _ckpt(d / "fill.safetensors", "cond_stage_model.transformer.text_model.x", in_ch=9)
    settings = Settings(port=0, state_dir=tmp_path_factory.mktemp("state"), cache_dir="", device="cpu",
                        model_dirs=[d], scan_usual_places=False, job_memory_bytes=memory_bytes)
    with ServerThread(settings) as srv:
        return httpx.get(srv.url + "/v1/models", headers={"Authorization": f"Bearer {srv.token}"}).json()


@pytest.fixture(scope="module")
def listing(tmp_path_factory):
    return _listing(tmp_path_factory, 64 * 1024**3)  # a machine where SDXL runs on the CPU


def test_a_machine_too_small_for_sdxl_is_recommended_sd15_for_pixels(tmp_path_factory):
    small = _listing(tmp_path_factory, 12 * 1024**3)  # SDXL in fp32 needs about 23 GiB
    names = {m["id"]: m.get("name") for m in small["models"]}
    assert names[small["recommended"]["pixels"]] == "dreamy"
    assert names[small["recommended"]["dia"]] == "dreamy"


def test_a_painter_is_offered_checkpoints_and_the_demo_never_tiny(listing):
    models = listing["models"]
    names = [m.get("name") for m in models_ui.offered(models, "pixels")]
    assert names[:2] == ["dreamy", "juggernaut"] and names[2] == "toy-sd" and names[3] == "fill"
    assert not {"tiny-sd", "tiny-sdxl", "toy-sd-64"} & set(names)
    dev = [m["id"] for m in models_ui.offered(models, "pixels", show_developer=True)]
    assert dev[-3:] == ["tiny-sd", "tiny-sdxl", "toy-sd-64"]
    juggernaut = next(m for m in models if m.get("name") == "juggernaut")
    assert models_ui.label(juggernaut).startswith("juggernaut \u2014 SDXL, ") and "configured" in models_ui.label(juggernaut)
    demo = next(m for m in models if m["id"] == "toy-sd")
    assert models_ui.label(demo) == "demo (toy world)"
    # the paper's family first: SDXL for PIXELS, SD 1.x for DIA
    assert models_ui.choose(models, "pixels", "", listing["recommended"]) == juggernaut["id"]
    assert models_ui.choose(models, "dia", "", listing["recommended"]).endswith("dreamy.safetensors")
    assert models_ui.choose(models, "dia", "/my/own.safetensors", listing["recommended"]) == "/my/own.safetensors"
    assert models_ui.choose([demo], "dia", "", {}) == "toy-sd"
    assert models_ui.help_text(models, listing) == ""
    none = models_ui.help_text([demo] + [m for m in models if m.get("developer")], {"models_dir": "/data/models"})
    assert "/data/models" in none and "Get a model" in none and "demo (toy world)" in none


def test_the_combo_lists_them_and_greys_what_the_method_cannot_use(kapp, listing):
    from PyQt6.QtWidgets import QComboBox

    combo = QComboBox()
    combo.setEditable(True)
    models_ui.fill_combo(combo, listing["models"], "pixels", "toy-sd")
    ids = [combo.itemData(i) for i in range(combo.count())]
    assert "tiny-sd" not in ids and combo.currentData() == "toy-sd"
    fill = ids.index(next(m["id"] for m in listing["models"] if m.get("name") == "fill"))
    assert not combo.model().item(fill).isEnabled() and combo.model().item(0).isEnabled()
    assert "inpainting" in combo.itemData(fill, 3)  # tooltip says why
    models_ui.fill_combo(combo, listing["models"], "pixels", "/typed/path.safetensors")
    assert combo.currentText() == "/typed/path.safetensors"


def test_the_choice_is_remembered_per_method(kapp):
    c = Controller(app=kapp)
    c.methods = [dict(m) for m in schemas.METHODS]
    c.set_method("pixels")
    c.set_model("/m/xl.safetensors")
    c.set_method("dia")
    c.set_model("/m/sd15.safetensors")
    c.set_method("pixels")
    assert c.model == "/m/xl.safetensors"
    c.set_method("dia")
    assert c.model == "/m/sd15.safetensors"
    c2 = Controller(app=kapp)  # and across restarts (Krita's settings)
    c2.methods = c.methods
    c2.set_method("pixels")
    assert c2.model == "/m/xl.safetensors"


def test_the_panel_shows_the_models_and_the_hint(kapp, listing):
    from analogon_krita.ui.panel import AnalogonPanel

    c = Controller(app=kapp)
    c.methods = [dict(m) for m in schemas.METHODS]
    c.method_id = "pixels"
    panel = AnalogonPanel(c)
    c.models = [m for m in listing["models"] if m.get("source") == "embedded"]
    c.models_info = {"models_dir": "/home/p/.local/share/analogon/models"}
    c.modelsChanged.emit()
    assert not panel.model_hint.isHidden() and "/home/p/.local/share/analogon/models" in panel.model_hint.text()
    assert [panel.model_combo.itemData(i) for i in range(panel.model_combo.count())] == ["toy-sd"]
    c.models = listing["models"]
    c.modelsChanged.emit()
    assert panel.model_hint.isHidden() and panel.model_combo.count() == 4
    kapp.writeSetting("analogon", "show_developer_models", "true")
    c.modelsChanged.emit()
    assert panel.model_combo.findData("tiny-sd") >= 0
    panel.deleteLater()


CPU = {"device": "cpu", "memory": {"total_bytes": 24 * 2**30}}
GPU_6 = {"device": "cuda", "memory": {"gpu_total_bytes": 6 * 2**30}}
GPU_24 = {"device": "cuda", "memory": {"gpu_total_bytes": 24 * 2**30}}


@pytest.mark.parametrize("health,expect", [(CPU, "dreamy"), (GPU_6, "dreamy"), (GPU_24, "juggernaut"),
                                           ({"device": "cuda"}, "juggernaut"), ({}, "juggernaut")])
def test_a_small_machine_gets_the_sd1_family(listing, health, expect):
    """PIXELS' paper model is SDXL: the backend recommends juggernaut; on the CPU or a GPU of
    6 GB the docker chooses the SD 1.x checkpoint, and says why."""
    models, rec = listing["models"], listing["recommended"]
    got = models_ui.choose(models, "pixels", "", rec, health)
    assert got == next(m["id"] for m in models if m.get("name") == expect)
    assert models_ui.choose(models, "pixels", "/my/xl.safetensors", rec, health) == "/my/xl.safetensors"


def test_why_the_sd1_checkpoint_was_chosen(kapp, listing):
    from analogon_krita.settings import Settings

    s = Settings(kapp)
    models, info = listing["models"], listing
    dreamy = next(m["id"] for m in models if m.get("name") == "dreamy")
    assert models_ui.small_machine(CPU) == "the backend runs on the CPU"
    assert models_ui.small_machine(GPU_6) == "the GPU has 6 GB" and models_ui.small_machine(GPU_24) == ""
    assert models_ui.why_chosen(models, "pixels", dreamy, s, info, CPU) == (
        "dreamy (SD 1.x) is chosen because the backend runs on the CPU: larger models (SDXL, SD 2.x) "
        "would be slow here and may not fit in memory. Pick another to override.")
    assert models_ui.why_chosen(models, "pixels", dreamy, s, info, GPU_24) == ""
    assert models_ui.why_chosen(models, "dia", dreamy, s, info, CPU) == ""  # the paper's own family
    models_ui.remember(s, "pixels", dreamy)  # the painter's own choice needs no reason
    assert models_ui.why_chosen(models, "pixels", dreamy, s, info, CPU) == ""


def test_switching_the_method_applies_its_recommendation(kapp, listing):
    """No model remembered for a method: switching to it takes the backend's recommendation
    for it (on this machine), not the previous method's model."""
    from analogon_krita.ui.panel import AnalogonPanel

    c = Controller(app=kapp)
    c.methods = [dict(m) for m in schemas.METHODS]
    c.link.models, c.link.models_info, c.link.health = listing["models"], listing, GPU_24
    by_name = {m.get("name"): m["id"] for m in listing["models"]}
    c.set_method("dia")
    assert c.model == by_name["dreamy"]  # DIA's paper model: SD 1.5
    c.set_method("pixels")
    assert c.model == by_name["juggernaut"]  # PIXELS': SDXL
    c.link.health = CPU
    c.set_method("dia")
    c.set_method("pixels")
    assert c.model == by_name["dreamy"]
    panel = AnalogonPanel(c)
    assert panel.model_hint.text().startswith("dreamy (SD 1.x) is chosen because the backend runs on the CPU")
    panel.model_combo.setCurrentIndex(panel.model_combo.findData(by_name["juggernaut"]))  # the painter's choice
    assert c.model == by_name["juggernaut"] and panel.model_hint.isHidden()
    c.set_method("dia")
    c.set_method("pixels")
    assert c.model == by_name["juggernaut"]  # remembered
    panel.deleteLater()


def test_backend_arguments(kapp):
    from analogon_krita.settings import Settings

    s = Settings(kapp)
    assert backend_options.backend_args(s) == ["--memory-preset", "auto"]
    s.set("memory_preset", "low")
    s.set_json("model_folders", ["/x/ComfyUI/models/checkpoints", "/my models/with spaces"])
    assert backend_options.backend_args(s) == ["--memory-preset", "low", "--models-dir",
                                               "/x/ComfyUI/models/checkpoints", "--models-dir", "/my models/with spaces"]
    s.set("memory_preset", "custom")
    s.set("device", "cuda:1")
    s.set("dtype", "bfloat16")
    s.set("cpu_offload", True)
    s.set("max_pixels", "786432")
    s.set_json("model_folders", [])
    assert backend_options.backend_args(s) == ["--device", "cuda:1", "--dtype", "bfloat16", "--cpu-offload",
                                               "--no-vae-tiling", "--max-pixels", "786432"]


@pytest.mark.parametrize("preset,health,expect", [
    ("auto", None, "The backend picks a preset when it starts, from the memory of its GPU: CPU only, "
                   "\u2264 6 GB, \u2264 12 GB, or more."),
    ("auto", CPU, "Automatic: this backend uses CPU only: CPU, float32, CPU offload off, VAE tiling on, "
                  "at most 1024\u00d71024 pixels per working image."),
    ("auto", GPU_6, "Automatic: this backend uses GPU with up to 6 GB: GPU, float16, CPU offload on, "
                    "VAE tiling on, at most 1024\u00d71024 pixels per working image."),
    ("auto", GPU_24, "Automatic: this backend uses GPU with more than 12 GB: GPU, float16, CPU offload off, "
                     "VAE tiling off, at most 2048\u00d72048 pixels per working image."),
    ("low", CPU, "This backend has no GPU: it runs this preset on the CPU (float32, CPU offload off, VAE "
                 "tiling on, at most 1024\u00d71024 pixels per working image). \u201cCPU only\u201d or "
                 "Automatic say so."),
    ("high", GPU_24, "GPU, float16, CPU offload off, VAE tiling off, at most 2048\u00d72048 pixels per "
                     "working image."),
])
def test_the_preset_summary_says_what_this_backend_uses(preset, health, expect):
    assert backend_options.preset_summary(preset, health) == expect


def test_the_summary_agrees_with_the_backend(kapp):
    """The plugin's reading of a preset is the backend's own (analogon.memory.resolve)."""
    from analogon import memory

    for health, info in ((CPU, {"device": "cpu", "vram_bytes": None}),
                         (GPU_6, {"device": "cuda", "vram_bytes": 6 * 2**30}),
                         (GPU_24, {"device": "cuda", "vram_bytes": 24 * 2**30})):
        for preset in memory.PRESET_NAMES:
            name, p = backend_options.effective(preset, health)
            got = memory.resolve(preset, info)
            assert (name, p["dtype"], p["cpu_offload"], p["vae_tiling"], p["max_pixels"]) == (
                got.preset, got.dtype, got.cpu_offload, got.vae_tiling, got.max_pixels), (preset, health)


def test_the_plugin_knows_the_backend_presets():
    from analogon import memory

    assert backend_options.PRESETS == memory.PRESETS
    assert [k for k, _ in backend_options.PRESET_CHOICES] == list(memory.PRESET_NAMES) + ["custom"]


def test_presets_and_folders_reach_the_started_backend(kapp, tmp_path):
    """Start backend with a stand-in command that writes down its arguments."""
    script = tmp_path / "fake_analogon.py"
    out = tmp_path / "argv.json"
    script.write_text(f"import json, sys\njson.dump(sys.argv[1:], open({str(out)!r}, 'w'))\n")
    kapp.writeSetting("analogon", "backend_command", f"{sys.executable} {script}")
    kapp.writeSetting("analogon", "memory_preset", "medium")
    kapp.writeSetting("analogon", "model_folders", json.dumps(["/p/Stable diffusion"]))
    c = Controller(app=kapp)
    c.set_model("/m/sd15.safetensors")
    c.start_backend()
    assert wait_until(lambda: out.exists() and c.process.state == "failed", 20), c.process.state
    argv = json.loads(out.read_text())
    assert argv[:5] == ["serve", "--host", "127.0.0.1", "--port", "0"]
    i = argv.index("--model")
    assert argv[i + 1] == "/m/sd15.safetensors"
    assert argv[argv.index("--memory-preset") + 1] == "medium"
    assert argv[argv.index("--models-dir") + 1] == "/p/Stable diffusion"
    c.process.stop()
