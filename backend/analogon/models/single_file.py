"""Single-file checkpoints (.safetensors in the original LDM layout, as Krita/ComfyUI users keep them)."""
from __future__ import annotations

from pathlib import Path

from ..errors import ModelError


def load_single_file(path: Path, dtype):
    raise ModelError("not_implemented", "Single-file checkpoints are not supported yet.", status=501)
