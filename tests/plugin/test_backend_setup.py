"""The settings dialog's backend tabs: memory preset and explicit settings saved for the
backend it starts, model folders, the install buttons, and Get a model against a real backend
whose hub is a stand-in on 127.0.0.1."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from analogon_krita.controller import Controller
from analogon_krita.install.installer import Installer
from analogon_krita.link import backend_options
from analogon_krita.ui.backend_setup import BackendSetup
from conftest import ROOT, wait_until

sys.path.insert(0, str(ROOT / "tests" / "backend"))


def test_memory_and_models_tabs_save_what_the_backend_gets(kapp, tmp_path):
    c = Controller(app=kapp)
    w = BackendSetup(c, Installer(venv=tmp_path / "venv", wheel=tmp_path / "analogon-0.1.0-py3-none-any.whl"))
    assert w.preset.currentData() == "auto" and not w.device.isEnabled()
    w.preset.setCurrentIndex(w.preset.findData("low"))
    assert w.offload.isChecked() and w.tiling.isChecked() and w.max_pixels.value() == 1024 * 1024
    assert "CPU offload on" in w.preset_summary.text()
    w.preset.setCurrentIndex(w.preset.findData("custom"))  # starts from the preset shown
    assert w.dtype.currentData() == "float16" and w.device.isEnabled() and w.max_pixels.isEnabled()
    w.device.setCurrentIndex(w.device.findData("cuda"))
    w.offload.setChecked(False)
    w.tiling.setChecked(True)
    w.max_pixels.setValue(800_000)
    w.folders.addItem("/home/p/ComfyUI/models/checkpoints")
    w.show_dev.setChecked(True)
    w.save()
    assert backend_options.backend_args(c.settings) == [
        "--device", "cuda", "--dtype", "float16", "--no-cpu-offload", "--vae-tiling", "--max-pixels", "800000",
        "--models-dir", "/home/p/ComfyUI/models/checkpoints"]
    assert c.settings.get_bool("show_developer_models")
    w2 = BackendSetup(c, Installer(venv=tmp_path / "venv"))  # read back
    assert w2.preset.currentData() == "custom" and w2.max_pixels.value() == 800_000
    assert w2.folders.item(0).text() == "/home/p/ComfyUI/models/checkpoints"


def test_install_buttons_follow_the_state(kapp, tmp_path):
    c = Controller(app=kapp)
    wheel = tmp_path / "analogon-0.3.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    w = BackendSetup(c, Installer(venv=tmp_path / "venv", wheel=wheel))
    assert w.install_pane.install_button.isEnabled() and not w.install_pane.update_button.isEnabled()
    assert not w.install_pane.uninstall_button.isEnabled() and not w.install_pane.cancel_install_button.isEnabled()
    assert "0.3.0" in w.install_pane.install_status.text() and str(tmp_path / "venv") in w.install_pane.install_status.text()
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "analogon").write_text("")
    (tmp_path / "venv" / "lib").mkdir()
    (tmp_path / "venv" / "lib" / "torch.so").write_bytes(b"x" * 2_500_000)
    w.install_pane._show_install_state()
    assert w.install_pane.update_button.isEnabled() and w.install_pane.uninstall_button.isEnabled()
    # Uninstall asks first, with what it frees
    asked = []
    w.install_pane.ask = lambda title, text: asked.append(text) or False
    w.install_pane.uninstall_button.click()
    assert asked == [f"Uninstall the Analogon backend? This frees 2.5 MB: the environment in {tmp_path / 'venv'}, "
                     "its Python and the download cache. Your models are kept."]
    assert (tmp_path / "venv").exists()
    # and so does Install over an installed one
    w.install_pane.install_button.click()
    assert asked[-1].startswith(f"Install the backend again? The installed one in {tmp_path / 'venv'} (2.5 MB) "
                                "is removed first") and not w.installer.running
    w.install_pane.ask = lambda title, text: True
    w.install_pane.uninstall_button.click()
    assert not (tmp_path / "venv").exists() and not w.install_pane.uninstall_button.isEnabled()
    none = BackendSetup(c, Installer(venv=tmp_path / "v2", wheel=None))
    none.installer.wheel = None
    none.install_pane._show_install_state()
    assert not none.install_pane.install_button.isEnabled() and "carries no backend" in none.install_pane.install_status.text()


def test_get_a_model_from_the_docker(kapp, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc
    import numpy as np
    from safetensors.numpy import save

    from analogon.models import download as dl
    from analogon.server import ServerThread, Settings
    from fake_hub import FakeHub

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hc, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    data = save({"model.diffusion_model.input_blocks.0.0.weight": np.zeros((2, 4, 1, 1), np.float16),
                 "cond_stage_model.transformer.text_model.pad": np.zeros(200_000, np.float32)})
    import hashlib

    monkeypatch.setattr(dl, "CATALOG", (dl.Recommended("tiny", "Tiny SD", "p/tiny", "tiny.safetensors", "sd1",
                                                        ("dia",), 800_000,
                                                        sha256=hashlib.sha256(data).hexdigest()),))
    models = tmp_path / "models"
    monkeypatch.setenv("ANALOGON_MODELS_DIR", str(models))
    with FakeHub() as hub:
        hub.files[("p/tiny", "tiny.safetensors")] = data
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        settings = Settings(port=0, state_dir=tmp_path / "state", cache_dir="", device="cpu",
                            scan_usual_places=True)
        with ServerThread(settings) as srv:
            kapp.writeSetting("analogon", "backend_url", srv.url)
            (tmp_path / "st").mkdir()
            (tmp_path / "st" / "server.json").write_text(
                '{"url": "%s", "token": "%s"}' % (srv.url, srv.token))
            kapp.writeSetting("analogon", "state_dir", str(tmp_path / "st"))
            c = Controller(app=kapp)
            done = []
            c.connect_backend(done.append)
            assert wait_until(lambda: done, 20) and done == [True], c.connection_message
            w = BackendSetup(c, Installer(venv=tmp_path / "venv"))
            assert wait_until(lambda: w.catalog.count() == 1, 10)
            assert "Tiny SD" in w.catalog.item(0).text() and w.download_button.isEnabled()
            assert w.catalog_dir.text() == f"Into {models}"
            w.download_button.click()
            assert wait_until(lambda: w.download_status.text().startswith("Downloaded"), 60), w.download_status.text()
            assert (models / "tiny.safetensors").read_bytes() == data
            assert wait_until(lambda: any(m.get("name") == "tiny" for m in c.models), 20)
            assert wait_until(lambda: "downloaded" in w.catalog.item(0).text(), 10)
            assert w.download_status.text().startswith("Downloaded")  # the catalog's refresh keeps it
            # Verify reads the file back against the publisher's SHA-256
            assert wait_until(lambda: w.verify_button.isEnabled(), 10)
            w.verify_button.click()
            assert wait_until(lambda: w.download_status.text().startswith("Verified"), 20), \
                w.download_status.text()
            (models / "tiny.safetensors").write_bytes(data[:-1] + b"x")  # damaged on disk
            w.verify_button.click()
            assert wait_until(lambda: "is not the publisher's file" in w.download_status.text(), 20), \
                w.download_status.text()


def test_the_download_bar_never_goes_back_when_the_checksum_starts(kapp, tmp_path):
    """Downloading fills the bar to 95 %, checking the SHA-256 the rest: the bytes counter
    starts again for the check, the bar does not."""
    from analogon_krita.link.client import Response

    w = BackendSetup(Controller(app=kapp), Installer(venv=tmp_path / "venv"))
    w._download_id = "d1"
    seen = []
    for stage, done in (("downloading", 11), ("downloading", 13), ("verifying", 2), ("verifying", 13)):
        body = {"stage": stage, "bytes": done * 2**20, "total": 13 * 2**20, "status": "running"}
        w._show_download(Response(200, json.dumps(body).encode()))
        seen.append(w.download_progress.value())
    assert seen == sorted(seen) and seen[0] < 950 and seen[1] == 950 and seen[-1] == 1000
    assert w.download_progress.format().startswith("verifying 14 / 14 MB")


def test_the_install_pane_shows_this_run_its_steps_and_follows_the_log(kapp, tmp_path):
    import json

    c = Controller(app=kapp)
    wheel = tmp_path / "analogon-0.3.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "analogon").write_text("")
    (tmp_path / "venv" / "analogon-install.json").write_text(json.dumps({"torch": "rocm"}))
    inst = Installer(venv=tmp_path / "venv", wheel=wheel, log_path=tmp_path / "log")
    pane = BackendSetup(c, inst).install_pane
    # Update keeps the build the backend was installed with
    assert pane.variant.currentData() == "rocm" and "(PyTorch for AMD GPU (ROCm, Linux))" in pane.install_status.text()
    pane.show()
    for i in range(300):
        inst.logLine.emit(f"an earlier run's line {i}")
    inst.started.emit()  # a new run: its own lines only
    assert pane.install_log.toPlainText() == ""
    for i in range(300):
        inst.logLine.emit(f"Downloading package{i} (1.0MiB)")
    bar = pane.install_log.verticalScrollBar()
    assert bar.maximum() > 0 and bar.value() == bar.maximum()  # follows its tail
    bar.setValue(0)  # the painter scrolls up to read: it stays there
    inst.logLine.emit("one more")
    assert bar.value() == 0
    inst.progress.emit(42, "Installing PyTorch (cpu): downloading torch (887 MB), 40 s")
    assert pane.install_step.text() == "Installing PyTorch (cpu): downloading torch (887 MB), 40 s"
    assert pane.install_progress.value() == 42 and pane.install_progress.format() == "42 %"


def test_the_catalogue_marks_a_checkpoint_already_on_disk(kapp, tmp_path):
    from analogon_krita.link.client import Response
    from analogon_krita.ui.backend_setup import on_disk, verdict, verifiable

    entry = {"id": "sd15", "title": "Stable Diffusion 1.5", "repo_id": "r/sd15", "filename": "v1-5-pruned-emaonly.safetensors",
             "methods": ["dia"], "size_bytes": 4_265_380_512}
    comfy = {"id": "/home/p/ComfyUI/models/checkpoints/v1-5-pruned-emaonly.safetensors", "location": "ComfyUI",
             "size_bytes": 4_265_380_512, "family": "sd1"}
    assert on_disk(entry, [comfy]) == " \u2014 already on disk (ComfyUI)"
    assert on_disk(entry, [dict(comfy, size_bytes=2_000_000_000)]) == ""  # another file of that name
    assert on_disk(entry, [{"id": "toy-sd", "source": "embedded"}]) == ""
    # the backend's own list of the family's checkpoints on disk
    kin = {"id": "/a/dreamy.safetensors", "name": "dreamy", "location": "Automatic1111 / Forge",
           "same_file": False}
    assert on_disk(dict(entry, on_disk=[kin]), []) == (
        " \u2014 you already have a checkpoint of this family: dreamy (Automatic1111 / Forge)")
    assert on_disk(dict(entry, on_disk=[kin, dict(kin, same_file=True, location="ComfyUI")]), []) == (
        " \u2014 already on disk (ComfyUI)")
    assert verifiable(dict(entry, sha256="ab" * 32, installed=True)) == ""
    assert verifiable(dict(entry, sha256="ab" * 32, on_disk=[dict(kin, same_file=True)])) == kin["id"]
    assert verifiable(dict(entry, sha256="ab" * 32, on_disk=[kin])) is None
    assert verifiable(dict(entry, installed=True)) is None  # nothing pinned to compare with
    assert verdict({"ok": True, "path": "/m/x", "sha256": "ab" * 32}).startswith("Verified: /m/x")
    assert "not the publisher's file" in verdict({"ok": False, "path": "/m/x", "sha256": "ab" * 32,
                                                  "expected": "cd" * 32})
    c = Controller(app=kapp)
    c.link.models = [comfy]
    w = BackendSetup(c, Installer(venv=tmp_path / "venv"))
    w._show_catalog(Response(200, json.dumps({"models": [entry], "models_dir": "/m"}).encode()))
    assert w.catalog.item(0).text() == ("Stable Diffusion 1.5 (about 4.3 GB; for dia) \u2014 already on disk "
                                        "(ComfyUI)")
