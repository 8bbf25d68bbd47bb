"""The trained toy-world models, shipped inside the package (see analogon.toyworld).

``toy-sd`` is trained on the 128x128 world (``toy128``) and is the model the project
measures on; ``toy-sd-64`` on the first, 64x64 world (``toy64``), kept where the test suite
needs speed.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ModelError

_ROOT = Path(__file__).parent

# The embedded toy models and their folders in the package. ``toy-sd`` is the model the
# project measures on and the docker's demo; ``toy-sd-64`` is always the first, 64x64
# world's model (the fast one the test suite uses where it needs speed, never offered to a
# painter).
TOY_FOLDERS = {"toy-sd": "toy_sd_128", "toy-sd-64": "toy_sd"}


def model_dir(world: str) -> Path:
    """Where ``analogon train-toy --world WORLD`` writes its model by default."""
    return _ROOT / {"toy64": "toy_sd", "toy128": "toy_sd_128"}[world]


def toy_available(name: str = "toy-sd") -> bool:
    return (_ROOT / TOY_FOLDERS[name] / "model_index.json").exists()


def toy_path(name: str = "toy-sd") -> Path:
    if not toy_available(name):
        raise ModelError(
            "model_not_available",
            f"The {name} model is not in this installation; train it with "
            "`analogon train-toy` or use tiny-sd.",
        )
    return _ROOT / TOY_FOLDERS[name]


def toy_sd_available() -> bool:
    return toy_available("toy-sd")


def toy_sd_path() -> Path:
    return toy_path("toy-sd")


# -- which toy world a model was trained on ----------------------------------------------

WORLD_FILE = "toy_world.json"  # {"world": "toy128"}: written by the export beside the model
RECORD_FILE = "toyworld.json"  # the export's record of the training (also names the world)
_SAMPLE_SIZE_WORLDS = {128: "toy128", 64: "toy64"}  # the VAE's sample_size -> its world
DEFAULT_WORLD = "toy64"


def _known_world(name) -> str | None:
    from ..toyworld.world import WORLDS

    return name if isinstance(name, str) and name in WORLDS else None


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def folder_world(folder: str | Path) -> str:
    """The toy world whose images the model in ``folder`` (a diffusers folder) makes:
    the ``"world"`` of its ``toy_world.json``, else of its ``toyworld.json`` (the export's
    record), else told by its VAE's ``sample_size`` (128: toy128, 64: toy64), else toy64 (a
    model of no toy world is measured on the first world)."""
    folder = Path(folder)
    for name in (WORLD_FILE, RECORD_FILE):
        world = _known_world((_read_json(folder / name) or {}).get("world"))
        if world:
            return world
    return sample_size_world((_read_json(folder / "vae" / "config.json") or {}).get("sample_size"))


def sample_size_world(size) -> str:
    """The toy world whose images a VAE of this ``sample_size`` (an int or a pair) makes:
    128 is toy128, 64 toy64, anything else toy64."""
    if isinstance(size, (list, tuple)) and size:
        size = size[0]
    return _SAMPLE_SIZE_WORLDS.get(size, DEFAULT_WORLD) if isinstance(size, int) else DEFAULT_WORLD


def model_world(spec: str) -> str:
    """The toy world of a model spec, without loading it: ``toy-sd`` and ``toy-sd-64`` are
    their shipped folders' worlds, a local diffusers folder its own (:func:`folder_world`);
    anything else (the random-weight models, single files, hub ids, a toy model not
    installed) is toy64."""
    spec = (spec or "").strip()
    if spec in TOY_FOLDERS:
        return folder_world(toy_path(spec)) if toy_available(spec) else DEFAULT_WORLD
    if not spec or spec in ("tiny-sd", "tiny-sdxl"):
        return DEFAULT_WORLD
    import os

    try:
        path = Path(os.path.expanduser(spec))
        if path.is_dir() and (path / "model_index.json").is_file():
            return folder_world(path)
    except (OSError, ValueError):
        pass
    return DEFAULT_WORLD
