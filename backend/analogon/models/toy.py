"""The trained toy-world models, shipped inside the package (see analogon.toyworld).

``toy-sd`` is trained on the 128x128 world (``toy128``) and is the model the project
measures on; ``toy-sd-64`` on the first, 64x64 world (``toy64``), kept where the test suite
needs speed.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ModelError

TOY_NATIVE_SIZE = 64
_ROOT = Path(__file__).parent
_HERE = _ROOT / "toy_sd"


def model_dir(world: str) -> Path:
    """Where ``analogon train-toy --world WORLD`` writes its model by default."""
    return _ROOT / {"toy64": "toy_sd", "toy128": "toy_sd_128"}[world]


def toy_sd_available() -> bool:
    return (_HERE / "model_index.json").exists()


def toy_sd_path() -> Path:
    if not toy_sd_available():
        raise ModelError(
            "model_not_available",
            "The toy-sd model is not in this installation; train it with "
            "`analogon train-toy` or use tiny-sd.",
        )
    return _HERE


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
    size = (_read_json(folder / "vae" / "config.json") or {}).get("sample_size")
    if isinstance(size, (list, tuple)) and size:
        size = size[0]
    return _SAMPLE_SIZE_WORLDS.get(size, DEFAULT_WORLD) if isinstance(size, int) else DEFAULT_WORLD


def model_world(spec: str) -> str:
    """The toy world of a model spec, without loading it: ``toy-sd`` is its shipped folder's
    world, a local diffusers folder its own (:func:`folder_world`); anything else (the
    random-weight models, single files, hub ids, a toy-sd not installed) is toy64."""
    spec = (spec or "").strip()
    if spec == "toy-sd":
        return folder_world(toy_sd_path()) if toy_sd_available() else DEFAULT_WORLD
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
