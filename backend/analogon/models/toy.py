"""The trained toy-world model ``toy-sd``, shipped inside the package (see analogon.toyworld)."""
from __future__ import annotations

from pathlib import Path

from ..errors import ModelError

TOY_NATIVE_SIZE = 64
_HERE = Path(__file__).parent / "toy_sd"


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
