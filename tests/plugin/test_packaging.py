"""The plugin zip (checked with Krita's own importer where Krita is installed), the profile
install, and the kritarc edit that enables the plugin."""
from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMPORTER = Path("/usr/share/krita/pykrita/plugin_importer/plugin_importer.py")
ROOMS = ("ui", "document", "link", "install")  # the plugin's sub-packages (docs/plugin.md, "Layout")


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def pk():
    return load("krita_plugin", ROOT / "packaging" / "krita_plugin.py")


def test_zip_layout(pk, tmp_path):
    z = pk.build_zip(tmp_path / "a.zip")
    names = zipfile.ZipFile(z).namelist()
    assert "analogon_krita/" in names and "analogon_krita/__init__.py" in names
    assert "analogon_krita.desktop" in names and "analogon_krita.action" in names
    assert "analogon_krita/icons/analogon.svg" in names and "analogon_krita/manual.html" in names
    # the plugin's rooms (sub-packages), each with its folder entry and its __init__.py
    for room in ROOMS:
        assert f"analogon_krita/{room}/" in names and f"analogon_krita/{room}/__init__.py" in names
    assert "analogon_krita/ui/panel.py" in names and "analogon_krita/install/installer.py" in names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    desktop = zipfile.ZipFile(z).read("analogon_krita.desktop").decode()
    assert "X-KDE-Library=analogon_krita" in desktop and "ServiceTypes=Krita/PythonPlugin" in desktop


@pytest.mark.skipif(not IMPORTER.exists(), reason="Krita's plugin importer is not installed")
def test_krita_importer_accepts_the_zip(pk, tmp_path):
    z = pk.build_zip(tmp_path / "a.zip")
    importer = load("plugin_importer", IMPORTER)
    res = tmp_path / "resources"
    res.mkdir()
    imported = importer.PluginImporter(str(z), str(res), lambda plugin: True).import_all()
    assert [p["name"] for p in imported] == ["analogon_krita"]
    assert (res / "pykrita" / "analogon_krita" / "controller.py").exists()
    for room in ROOMS:
        assert (res / "pykrita" / "analogon_krita" / room / "__init__.py").exists()
    assert (res / "pykrita" / "analogon_krita" / "document" / "document.py").exists()
    assert (res / "pykrita" / "analogon_krita.desktop").exists()
    assert (res / "actions" / "analogon_krita.action").exists()


def test_install_into_a_profile_and_enable(pk, tmp_path):
    kritarc = tmp_path / "config" / "kritarc"
    kritarc.parent.mkdir()
    kritarc.write_text("[General]\nfoo=1\n\n[python]\nenable_other=true\nenable_analogon_krita=false\n\n[X]\ny=2\n")
    dest = pk.install(tmp_path / "res", tmp_path / "config")
    assert (dest / "ui" / "panel.py").exists() and (dest / "icons" / "generate.svg").exists()
    assert all((dest / room / "__init__.py").exists() for room in ROOMS)
    assert (tmp_path / "res" / "pykrita" / "analogon_krita.desktop").exists()
    text = kritarc.read_text()
    assert "enable_analogon_krita=true" in text and "enable_analogon_krita=false" not in text
    assert "enable_other=true" in text and "foo=1" in text and "[X]\ny=2" in text
    fresh = tmp_path / "fresh" / "kritarc"
    pk.enable_in_kritarc(fresh)
    assert fresh.read_text() == "[python]\nenable_analogon_krita=true\n"


def test_action_file_lists_the_extension_actions(pk):
    from analogon_krita.extension import AnalogonExtension

    text = (ROOT / "manifest" / "analogon_krita.action").read_text()
    for action_id, _, _ in AnalogonExtension.ACTIONS:
        assert f'<Action name="{action_id}">' in text


def _shortcuts(path: Path) -> dict[str, str]:
    """key combination (normalised: lower case, modifiers sorted) -> action name."""
    import xml.etree.ElementTree as ET

    out = {}
    for action in ET.parse(path).getroot().iter("Action"):
        text = action.findtext("shortcut") or ""
        for part in text.split(";"):
            if part.strip():
                out["+".join(sorted(part.strip().lower().replace(" ", "").split("+")))] = action.get("name")
    return out


KRITA_ACTIONS = sorted(Path("/usr/share/krita/actions").glob("*.action"))


@pytest.mark.skipif(not KRITA_ACTIONS, reason="Krita's action files are not installed")
def test_no_default_shortcut_clashes_with_krita():
    ours = _shortcuts(ROOT / "manifest" / "analogon_krita.action")
    krita = {}
    for f in KRITA_ACTIONS:
        krita.update(_shortcuts(f))
    assert "alt+ctrl+g" in krita  # the parser reads Krita's own file (Quick Ungroup)
    assert ours, "Generate has a default shortcut"
    assert not set(ours) & set(krita), {k: (ours[k], krita[k]) for k in set(ours) & set(krita)}


def test_release_zip_carries_the_backend_wheel(release, pk):
    z, wheel = release
    assert z.name == f"analogon_krita-{pk.backend_version()}.zip"
    names = zipfile.ZipFile(z).namelist()
    assert f"analogon_krita/backend/{wheel.name}" in names
    assert "analogon_krita/backend/requirements/lock.txt" in names
    # and the pinned uv the docker's installer downloads (PyPI's wheel, its SHA-256)
    assert zipfile.ZipFile(z).read("analogon_krita/backend/uv.json") == (pk.ROOT / "packaging" / "uv.json").read_bytes()
    # the wheel in the zip is the wheel that was built, and it is the backend of this checkout
    assert zipfile.ZipFile(z).read(f"analogon_krita/backend/{wheel.name}") == wheel.read_bytes()
    w = zipfile.ZipFile(wheel)
    meta = w.read(f"analogon-{pk.backend_version()}.dist-info/METADATA").decode()
    assert f"Version: {pk.backend_version()}" in meta
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    from packaging.requirements import Requirement

    requires = {str(Requirement(line.split(": ", 1)[1])) for line in meta.splitlines()
                if line.startswith("Requires-Dist: ") and "extra" not in line}
    assert requires == {str(Requirement(d)) for d in declared}
    wnames = w.namelist()
    assert "analogon/cli.py" in wnames and "analogon/models/toy_sd/model_index.json" in wnames
    assert "analogon/models/toy_sd_128/model_index.json" in wnames
    assert "analogon/models/configs/sd15/unet/config.json" in wnames
    entry = w.read(f"analogon-{pk.backend_version()}.dist-info/entry_points.txt").decode()
    assert "analogon = analogon.cli:main" in entry


@pytest.mark.skipif(not IMPORTER.exists(), reason="Krita's plugin importer is not installed")
def test_krita_importer_extracts_the_wheel(release, tmp_path):
    z, wheel = release
    importer = load("plugin_importer", IMPORTER)
    res = tmp_path / "resources"
    res.mkdir()
    imported = importer.PluginImporter(str(z), str(res), lambda plugin: True).import_all()
    assert [p["name"] for p in imported] == ["analogon_krita"]
    bundled = res / "pykrita" / "analogon_krita" / "backend" / wheel.name
    assert bundled.read_bytes() == wheel.read_bytes()
    from analogon_krita.install import installer

    assert installer.bundled_wheel(res / "pykrita" / "analogon_krita") == bundled


def test_an_old_setuptools_is_named_with_the_fix(pk, tmp_path):
    """`make dist` with a Python whose setuptools is too old (or missing): a sentence that says
    what to install, not a traceback."""
    import subprocess
    import sys

    old = tmp_path / "old"
    (old / "setuptools").mkdir(parents=True)
    (old / "setuptools" / "__init__.py").write_text("__version__ = '59.6.0'\n")
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nPYTHONPATH={old} exec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    with pytest.raises(pk.BuildToolError, match=r"needs setuptools 77 or newer; .* has 59\.6\.0: .*make dist"):
        pk.build_wheel(tmp_path / "out", str(python))
    out = subprocess.run([sys.executable, str(ROOT / "packaging" / "krita_plugin.py"), "release", "-o",
                          str(tmp_path / "out"), "--python", str(python)], capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr.startswith("error: Building the backend wheel needs setuptools")
    assert "Traceback" not in out.stderr
    assert int(pk.check_build_tools().split(".")[0]) >= 77  # this environment builds it
