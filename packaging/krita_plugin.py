"""Build the Analogon Krita plugin zip, or install the plugin into a Krita profile.

    python packaging/krita_plugin.py zip [-o dist/analogon_krita.zip]
    python packaging/krita_plugin.py release [-o dist/]
    python packaging/krita_plugin.py install [--resources DIR] [--config DIR] [--no-enable]

The zip is what Krita's Tools ▸ Scripts ▸ Import Python Plugin from File… accepts: the
``analogon_krita.desktop`` file, the ``analogon_krita/`` package (with its icons and manual)
and ``analogon_krita.action``. ``install`` puts the same files into a profile's resources
folder (``pykrita/`` and ``actions/``) and enables the plugin in ``kritarc``.

``release`` builds the backend wheel (with pip, from this checkout) and a zip that also
carries it, with the locked requirement files and the pinned uv (``uv.json``), under
``analogon_krita/backend/``: Krita's
importer extracts everything under the package folder, so the docker's installer finds the
exact backend version that matches the plugin beside its own code
(``dist/analogon_krita-VERSION.zip``). Standard library only (and pip for the wheel).
"""
from __future__ import annotations

import argparse
import html
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAME = "analogon_krita"
PACKAGE = ROOT / "plugin" / NAME
DESKTOP = ROOT / "manifest" / f"{NAME}.desktop"
ACTION = ROOT / "manifest" / f"{NAME}.action"
ICONS = ROOT / "icons"
MANUAL = ROOT / "docs" / "plugin.md"
REQUIREMENTS = ROOT / "packaging" / "requirements"
UV_PINS = ROOT / "packaging" / "uv.json"  # PyPI's uv wheel per platform (uv_pin.py)
BUNDLE = "backend"  # the folder inside the package that carries the wheel and the lock files


def backend_version() -> str:
    """``__version__`` of the backend package, read without importing it."""
    text = (ROOT / "backend" / "analogon" / "__init__.py").read_text(encoding="utf-8")
    m = re.search(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", text, re.M)
    if not m:
        raise RuntimeError("no __version__ in backend/analogon/__init__.py")
    return m.group(1)


SETUPTOOLS_MIN = (77,)  # pyproject.toml's [build-system] (its SPDX license field)


class BuildToolError(RuntimeError):
    """The Python that builds the wheel lacks pip or a new enough setuptools: what to do."""


def check_build_tools(python: str | None = None) -> str:
    """The setuptools version of ``python`` (default: this one), or BuildToolError saying what
    to install; ``make dist`` makes a small environment with them."""
    python = python or sys.executable
    probe = subprocess.run([python, "-c", "import importlib.util, setuptools; assert importlib.util.find_spec('pip'); "
                                          "print(setuptools.__version__)"], capture_output=True, text=True)
    fix = (f"{python} -m pip install --upgrade pip 'setuptools>={'.'.join(map(str, SETUPTOOLS_MIN))}' "
           "(or run `make dist`, which makes a small build environment of its own)")
    if probe.returncode != 0:
        raise BuildToolError(f"Building the backend wheel needs pip and setuptools in {python}: {fix}.")
    version = probe.stdout.strip()
    numbers = tuple(int(p) for p in re.findall(r"\d+", version)[:len(SETUPTOOLS_MIN)])
    if numbers < SETUPTOOLS_MIN:
        raise BuildToolError(f"Building the backend wheel needs setuptools "
                             f"{'.'.join(map(str, SETUPTOOLS_MIN))} or newer; {python} has {version}: {fix}.")
    return version


def build_wheel(out_dir: Path, python: str | None = None) -> Path:
    """The backend wheel, built by pip from this checkout (no dependencies, no build
    isolation: setuptools comes from the running environment, nothing is downloaded)."""
    check_build_tools(python)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"analogon-{backend_version()}-py3-none-any.whl"
    (out_dir / name).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="analogon-wheel-") as tmp:
        # pip builds in a copy: the checkout gets no build/ or egg-info from it
        src = Path(tmp) / "src"
        shutil.copytree(ROOT / "backend", src / "backend",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        for f in ("pyproject.toml", "README.md"):
            shutil.copy2(ROOT / f, src / f)
        subprocess.run([python or sys.executable, "-m", "pip", "wheel", "--no-deps",
                        "--no-build-isolation", "--no-index", "-q", "-w", str(out_dir), str(src)],
                       check=True)
    wheel = out_dir / name
    if not wheel.exists():
        raise RuntimeError(f"pip did not write {wheel}")
    return wheel


def _package_files() -> list[tuple[Path, str]]:
    """(source, path inside the package folder)."""
    out = []
    for p in sorted(PACKAGE.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo"):
            out.append((p, p.relative_to(PACKAGE).as_posix()))
    for p in sorted(ICONS.glob("*.svg")):
        out.append((p, f"icons/{p.name}"))
    return out


def manual_html() -> str:
    text = MANUAL.read_text(encoding="utf-8") if MANUAL.exists() else "Analogon for Krita."
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Analogon</title></head>"
            "<body><pre style=\"white-space: pre-wrap; font-family: sans-serif\">"
            + html.escape(text) + "</pre></body></html>\n")


def build_zip(out: Path, wheel: Path | None = None) -> Path:
    """The plugin zip; with ``wheel``, the backend wheel and the lock files ride along in
    ``analogon_krita/backend/``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        # Krita's importer looks for the folder entries themselves ("analogon_krita/"); the
        # package's sub-packages (ui/, document/, link/, install/) and icons/ get theirs too.
        files = _package_files()
        folders = sorted({Path(rel).parent.as_posix() for _, rel in files} - {"."})
        z.writestr(zipfile.ZipInfo(f"{NAME}/"), b"")
        for folder in folders:
            z.writestr(zipfile.ZipInfo(f"{NAME}/{folder}/"), b"")
        z.write(DESKTOP, f"{NAME}.desktop")
        z.write(ACTION, f"{NAME}.action")
        for src, rel in files:
            z.write(src, f"{NAME}/{rel}")
        z.writestr(f"{NAME}/manual.html", manual_html())
        if wheel is not None:
            z.writestr(zipfile.ZipInfo(f"{NAME}/{BUNDLE}/"), b"")
            z.write(wheel, f"{NAME}/{BUNDLE}/{Path(wheel).name}")
            for req in sorted(REQUIREMENTS.glob("*.txt")):
                z.write(req, f"{NAME}/{BUNDLE}/requirements/{req.name}")
            z.write(UV_PINS, f"{NAME}/{BUNDLE}/uv.json")
    return out


def build_release(out_dir: Path, python: str | None = None) -> Path:
    """``dist/analogon_krita-VERSION.zip``: the plugin with the backend wheel inside."""
    out_dir = Path(out_dir)
    wheel = build_wheel(out_dir, python)
    return build_zip(out_dir / f"{NAME}-{backend_version()}.zip", wheel)


def default_resources_dir() -> Path:
    """Krita's per-user resources folder."""
    if sys.platform == "win32":
        return Path(os.environ.get("APPDATA", Path.home() / "AppData" / "Roaming")) / "krita"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "krita"
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "krita"


def default_config_dir() -> Path:
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Preferences"
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")


def enable_in_kritarc(kritarc: Path, name: str = NAME) -> None:
    """Set ``enable_<name>=true`` in the ``[python]`` section, keeping every other line."""
    key = f"enable_{name}"
    lines = kritarc.read_text(encoding="utf-8").splitlines() if kritarc.exists() else []
    out, in_python, done, seen_python = [], False, False, False
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            if in_python and not done:
                out.append(f"{key}=true")
                done = True
            in_python = stripped == "[python]"
            seen_python = seen_python or in_python
        elif in_python and stripped.split("=", 1)[0].strip() == key:
            out.append(f"{key}=true")
            done = True
            continue
        out.append(line)
    if in_python and not done:
        out.append(f"{key}=true")
        done = True
    if not seen_python:
        if out and out[-1].strip():
            out.append("")
        out += ["[python]", f"{key}=true"]
    kritarc.parent.mkdir(parents=True, exist_ok=True)
    kritarc.write_text("\n".join(out) + "\n", encoding="utf-8")


def install(resources: Path | None = None, config: Path | None = None, enable: bool = True) -> Path:
    """Copy the plugin into ``resources``/pykrita (and the action file into actions/)."""
    resources = Path(resources or default_resources_dir())
    pykrita = resources / "pykrita"
    dest = pykrita / NAME
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "icons").mkdir(parents=True)
    for src, rel in _package_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    (dest / "manual.html").write_text(manual_html(), encoding="utf-8")
    shutil.copy2(DESKTOP, pykrita / f"{NAME}.desktop")
    (resources / "actions").mkdir(parents=True, exist_ok=True)
    shutil.copy2(ACTION, resources / "actions" / f"{NAME}.action")
    if enable:
        enable_in_kritarc(Path(config or default_config_dir()) / "kritarc")
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    z = sub.add_parser("zip", help="build the zip for Import Python Plugin from File")
    z.add_argument("-o", "--output", default=str(ROOT / "dist" / f"{NAME}.zip"))
    r = sub.add_parser("release", help="the backend wheel and a zip that carries it")
    r.add_argument("-o", "--output", default=str(ROOT / "dist"), help="output folder (default dist/)")
    r.add_argument("--python", help="the Python whose pip builds the wheel (default: this one)")
    i = sub.add_parser("install", help="install into a Krita profile")
    i.add_argument("--resources", help=f"Krita resources folder (default {default_resources_dir()})")
    i.add_argument("--config", help=f"folder holding kritarc (default {default_config_dir()})")
    i.add_argument("--no-enable", action="store_true", help="do not enable the plugin in kritarc")
    args = p.parse_args(argv)
    try:
        return _run(args)
    except BuildToolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _run(args) -> int:
    if args.command == "zip":
        print(build_zip(Path(args.output)))
    elif args.command == "release":
        print(build_release(Path(args.output), args.python))
    else:
        dest = install(args.resources and Path(args.resources), args.config and Path(args.config),
                       enable=not args.no_enable)
        print(f"installed into {dest}; restart Krita and open Settings \u25b8 Dockers \u25b8 Analogon")
    return 0


if __name__ == "__main__":
    sys.exit(main())
