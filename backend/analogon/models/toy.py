"""The trained toy-world models, shipped inside the package (see analogon.toyworld).

``toy-sd`` is trained on the 128x128 world (``toy128``) and is the model the project
measures on; ``toy-sd-64`` on the first, 64x64 world (``toy64``), kept where the test suite
needs speed.
"""
from __future__ import annotations

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
